"""GPT-J-6B in float16 fits one 24 GB GPU: counted on a meta-device model, estimate checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, GPTJConfig

from rome_edit.assembly.memory import GIB, estimate_edit_memory, largest_chunk, meta_model
from rome_edit.models.loading import bundled_model_path, wrap_model
from rome_edit.weights.write import preserved

ROOT = Path(__file__).resolve().parents[1]
# EleutherAI/gpt-j-6b's config.json (the shapes that matter)
GPTJ_6B = GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400,
                     n_positions=2048, n_inner=None)


@pytest.fixture(scope="module")
def gptj6b():
    model = meta_model(GPTJ_6B)
    assert all(p.device.type == "meta" for p in model.parameters())  # no storage at all
    return model


class _NewBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor an operation creates (works on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views (detach, slicing) and in-place writes allocate nothing
        if not func.is_view and func is not torch.ops.aten.copy_.default:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def test_gptj_6b_float16_edit_fits_24_gb(gptj6b):
    est = estimate_edit_memory(gptj6b, "float16", layer=5, chunk_size=4)
    assert est.parameters == 6_050_882_784
    assert est.weights == 2 * est.parameters  # 11.3 GiB
    assert est.revert_copy == 4096 * 16384 * 2  # one W_out, 128 MiB, not a second model
    assert est.fits(24 * GIB)  # with 10 % held back for the allocator and CUDA context
    assert not estimate_edit_memory(gptj6b, "float32", layer=5, chunk_size=4).fits(24 * GIB)
    assert estimate_edit_memory(gptj6b, "float16", layer=5, chunk_size=8).fits(24 * GIB)
    assert 8 <= largest_chunk(gptj6b, 24 * GIB, layer=5) < 16
    assert est.host_second_moment == 16384**2 * 12  # C and its factor stay in host RAM


def test_revert_copies_only_the_edited_matrix(gptj6b):
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    lm = wrap_model(gptj6b.half(), tokenizer, "gpt-j-6b-shaped")
    with _NewBytes() as counter, preserved(lm, [5]):
        pass
    assert counter.bytes == 4096 * 16384 * 2


def test_second_moment_is_inverted_once():
    from rome_edit.stats.second_moment import SecondMoment

    a = torch.randn(64, 8, dtype=torch.float64)
    stats = SecondMoment(a.T @ a / 64, "m@x", 1, "c", 1, 64, "float64")
    assert stats.inverse() is stats.inverse()
    assert stats.inverse(1e-3) is not stats.inverse()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("shape", [["--width", "256", "--layers", "6", "--chunk", "8",
                                    "--vocab", "16384"],
                                   ["--width", "512", "--layers", "8", "--chunk", "8"]])
def test_estimate_bounds_the_measured_peak(shape):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "measure_edit_memory.py"),
                           *shape], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # an upper bound, and not a loose one: measured peak RSS growth ≤ estimate ≤ 1.6 × measured
    assert 1.0 <= result["estimate_over_measured"] <= 1.6, result
