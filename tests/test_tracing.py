import json

import pytest
import torch
from conftest import FAMILIES, make_tiny

from rome_edit.cli.main import main
from rome_edit.models.architectures import get_module
from rome_edit.models.hooks import capture
from rome_edit.models.subject import SubjectNotFoundError
from rome_edit.tracing import reuse
from rome_edit.tracing.average import (
    ROLES,
    align_roles,
    excluded_layers,
    locate,
    recommend_layer,
    role_positions,
)
from rome_edit.tracing.core import (
    clean_run,
    corrupted_run,
    module_name,
    prepare_prompt,
    restored_layers,
    state_names,
)
from rome_edit.tracing.fast import MAX_ROWS, plan_passes, rows_per_chunk
from rome_edit.tracing.noise import (
    NoiseSpec,
    corrupt_subject,
    embedding_std,
    resolve_noise,
    subject_noise,
)
from rome_edit.tracing.plain import restored_probability
from rome_edit.tracing.reuse import last_position_mlp
from rome_edit.tracing.trace import trace

TEMPLATE = "Name: {}. Gender:"


def _setup(lm, subject="Brittany", std=0.5, seed=1):
    tp = prepare_prompt(lm, TEMPLATE, subject)
    noise = subject_noise(10, tp.end - tp.start, lm.model.config.hidden_size, std, seed)
    probs, clean = clean_run(lm, tp, state_names(lm.arch, ("hidden", "mlp", "attn"),
                                                 lm.n_layers))
    return tp, noise, probs[tp.answer_id].item(), clean


# --- noise -----------------------------------------------------------------------------------

def test_noise_is_reproducible_per_seed():
    a = subject_noise(10, 3, 8, 0.5, seed=1)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(a, subject_noise(10, 3, 8, 0.5, seed=1))
    assert not torch.equal(a, subject_noise(10, 3, 8, 0.5, seed=2))
    assert a.shape == (10, 3, 8)
    assert 0.4 < a.std().item() < 0.6


@pytest.mark.parametrize("text, value, relative", [
    ("3x", 3.0, True), ("s3", 3.0, True), ("2.5X", 2.5, True), ("0.1", 0.1, False),
    (0.2, 0.2, False),
])
def test_noise_spec(text, value, relative):
    assert NoiseSpec.parse(text) == NoiseSpec(value, relative)


@pytest.mark.parametrize("bad", ["abc", "-1", "0x", "", "nan", float("inf")])
def test_noise_spec_rejects(bad):
    with pytest.raises(ValueError, match="noise level"):
        NoiseSpec.parse(bad)


def test_noise_std_multiple_of_embedding_std(tiny_gptj):
    lm = tiny_gptj
    subjects = ["Brittany", "John", "Ani"]
    embed = get_module(lm.model, lm.arch.embed).weight
    ids = [i for s in subjects for i in lm.tokenizer(" " + s)["input_ids"]]
    expected = embed[ids].std().item()
    assert embedding_std(lm, TEMPLATE, subjects) == pytest.approx(expected, rel=1e-5)
    assert resolve_noise(lm, "3x", TEMPLATE, subjects) == pytest.approx(3 * expected, rel=1e-5)
    assert resolve_noise(lm, "0.25", TEMPLATE, subjects) == 0.25


def test_noise_reaches_only_subject_tokens(tiny_gptj):
    lm = tiny_gptj
    tp = prepare_prompt(lm, TEMPLATE, "Brittany")
    noise = subject_noise(2, tp.end - tp.start, 32, 1.0, seed=0)
    batch = tp.input_ids.repeat(2, 1)
    with capture(lm.model, [lm.arch.embed]) as clean:
        lm.model(input_ids=batch)
    with corrupt_subject(lm, tp.start, tp.end, noise), capture(lm.model, [lm.arch.embed]) as rec:
        lm.model(input_ids=batch)
    diff = rec.outputs[lm.arch.embed] - clean.outputs[lm.arch.embed]
    torch.testing.assert_close(diff[:, tp.start : tp.end], noise)
    assert diff[:, : tp.start].abs().max() == 0 and diff[:, tp.end :].abs().max() == 0


# --- restoration ground truth ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_restoring_all_gives_clean_and_none_gives_corrupt(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    tp, noise, p_clean, clean = _setup(lm)
    p_corrupt = corrupted_run(lm, tp, noise)
    assert abs(p_clean - p_corrupt) > 1e-4  # the corruption must matter for this to test much
    assert restored_probability(lm, tp, noise, clean, []) == pytest.approx(p_corrupt, abs=1e-7)
    for layer in (0, lm.n_layers - 1):
        states = [(module_name(lm.arch, "hidden", layer), t) for t in range(tp.n_tokens)]
        assert restored_probability(lm, tp, noise, clean, states) == \
            pytest.approx(p_clean, abs=1e-6)


def test_restored_window_is_centred_and_clipped():
    assert list(restored_layers("mlp", 5, 10, 28)) == list(range(0, 10))
    assert list(restored_layers("mlp", 20, 10, 28)) == list(range(15, 25))
    assert list(restored_layers("attn", 27, 10, 28)) == list(range(22, 28))
    assert list(restored_layers("mlp", 2, 3, 6)) == [1, 2, 3]
    assert list(restored_layers("hidden", 4, 10, 28)) == [4]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_equals_plain(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    kwargs = dict(noise_std=0.5, window=3)
    plain = trace(lm, TEMPLATE, "Emma", method="plain", **kwargs)
    quick = trace(lm, TEMPLATE, "Emma", method="fast", max_batch=40, **kwargs)
    assert quick.p_clean == pytest.approx(plain.p_clean, abs=1e-7)
    assert quick.p_corrupt == pytest.approx(plain.p_corrupt, abs=1e-6)
    for kind in plain.effects:
        torch.testing.assert_close(quick.effects[kind], plain.effects[kind], atol=1e-5, rtol=0)
        assert plain.effects[kind].abs().max() > 1e-3  # effects ≫ the tolerance


def test_fast_without_prefix_reuse_equals_plain(tiny_gptj, monkeypatch):
    monkeypatch.setattr(reuse, "PREFIX_FAMILIES", frozenset())
    plain = trace(tiny_gptj, TEMPLATE, "Ani", noise_std=0.5, method="plain")
    quick = trace(tiny_gptj, TEMPLATE, "Ani", noise_std=0.5, max_batch=10)
    for kind in plain.effects:
        torch.testing.assert_close(quick.effects[kind], plain.effects[kind], atol=1e-5, rtol=0)


def test_pass_planning_covers_every_cell_once():
    starts = [0, 0, 1, 2, 2, 2, 3, 4, 5]
    for max_cells in (1, 2, 4, 100):
        passes = plan_passes(starts, 6, max_cells)
        assert [i for lo, hi in passes for i in range(lo, hi)] == list(range(len(starts)))
        assert all(0 < hi - lo <= max_cells for lo, hi in passes)


def test_rows_per_chunk(tiny_gptj):
    assert rows_per_chunk(tiny_gptj, 10, max_batch=30) == 30
    assert 1 <= rows_per_chunk(tiny_gptj, 10) <= MAX_ROWS
    with pytest.raises(ValueError, match="max_batch"):
        rows_per_chunk(tiny_gptj, 10, max_batch=0)


def test_last_position_mlp_keeps_the_last_logits(tiny_model):
    ids = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    reference = tiny_model.model(input_ids=ids).logits[:, -1]
    with last_position_mlp(tiny_model):
        trimmed = tiny_model.model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(trimmed, reference, atol=1e-5, rtol=0)


def test_trace_structure(tiny_gptj):
    result = trace(tiny_gptj, TEMPLATE, "Brittany", noise_std=0.5)
    n_layers = tiny_gptj.n_layers
    for grid in result.effects.values():
        assert grid.shape == (len(result.tokens), n_layers)
        assert grid[: result.subject_start].abs().max() == 0  # noise cannot reach these
    # Restoring the last token's final hidden state restores the output exactly.
    assert result.effects["hidden"][-1, -1].item() == pytest.approx(result.total_effect,
                                                                     abs=1e-6)
    assert result.window == 1  # round(10 * 4 / 28)
    record = json.loads(json.dumps(result.to_json()))
    assert record["effects"]["mlp"]["rows"] == list(result.tokens)
    again = trace(tiny_gptj, TEMPLATE, "Brittany", noise_std=0.5)
    assert torch.equal(again.effects["mlp"], result.effects["mlp"])
    other = trace(tiny_gptj, TEMPLATE, "Brittany", noise_std=0.5, seed=2)
    assert other.p_corrupt != result.p_corrupt


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt="Name: Brittany. Gender:", subject="Tiffany"), SubjectNotFoundError,
     "does not occur"),
    (dict(answer=" Brittany"), ValueError, "one token is required"),
    (dict(window=5), ValueError, "window 5"),
    (dict(window=0), ValueError, "window 0"),
    (dict(kinds=["mlp", "embed"]), ValueError, "unknown kinds"),
    (dict(method="slow"), ValueError, "unknown method"),
    (dict(noise_std=0.0), ValueError, "noise_std"),
])
def test_bad_input(tiny_gptj, kwargs, error, match):
    args = dict(prompt=TEMPLATE, subject="Brittany", noise_std=0.5) | kwargs
    prompt, subject = args.pop("prompt"), args.pop("subject")
    with pytest.raises(error, match=match):
        trace(tiny_gptj, prompt, subject, **args)


def test_prompt_without_braces_is_accepted(tiny_gptj):
    a = trace(tiny_gptj, "Name: Brittany. Gender:", "Brittany", noise_std=0.5, kinds=["mlp"])
    b = trace(tiny_gptj, TEMPLATE, "Brittany", noise_std=0.5, kinds=["mlp"])
    assert torch.equal(a.effects["mlp"], b.effects["mlp"])


# --- averaging -------------------------------------------------------------------------------

def test_role_alignment():
    grid = torch.arange(10.0)[:, None].repeat(1, 3)  # row value = token index
    roles = align_roles(grid, start=2, end=7)  # 'Name', ':', 5 subject tokens, 3 after
    assert roles[:, 0].tolist() == [2.0, 4.0, 6.0, 7.0, 8.0, 9.0]
    short = align_roles(grid[:6], start=2, end=4)  # two-token subject, two tokens after
    assert short[0, 0] == 2 and torch.isnan(short[1]).all() and short[2, 0] == 3
    assert short[3, 0] == 4 and torch.isnan(short[4]).all() and short[5, 0] == 5
    assert role_positions(0, 1, 1) == [[0], [], [0], [], [], [0]]
    assert len(ROLES) == 6


def test_recommendation_skips_layer_zero_on_parallel_blocks():
    effect = torch.tensor([0.9, 0.6, 0.5, 0.1])
    assert excluded_layers(parallel=True, window=1, n_layers=4) == (0,)
    assert excluded_layers(parallel=True, window=3, n_layers=4) == (0, 1)  # windows reach 0
    assert excluded_layers(parallel=True, window=4, n_layers=4) == (0, 1, 2)
    assert excluded_layers(parallel=True, window=2, n_layers=2) == (0,)  # all would be
    assert excluded_layers(parallel=False, window=3, n_layers=4) == ()
    assert recommend_layer(effect, (0,)) == 1
    assert recommend_layer(effect, (0, 1)) == 2
    assert recommend_layer(effect) == 0


# (subject, expected answer) pairs for locate
NAMES = [("Emma", " Female"), ("Liam", " Male"), ("Jessica", " Female"), ("John", " Male")]


def test_locate_fast_equals_plain_and_counts(tiny_gptj):
    kwargs = dict(noise="3x", min_effect=-1.0, progress=False)
    quick = locate(tiny_gptj, TEMPLATE, NAMES, **kwargs)
    plain = locate(tiny_gptj, TEMPLATE, NAMES, method="plain", **kwargs)
    assert quick.n_cases + quick.n_skipped == len(NAMES)
    assert quick.n_cases > 0 and set(quick.skipped) <= {"wrong answer"}
    assert (quick.n_cases, quick.skipped) == (plain.n_cases, plain.skipped)
    for kind in quick.effects:
        torch.testing.assert_close(quick.effects[kind], plain.effects[kind], atol=1e-5,
                                   rtol=0, equal_nan=True)
    assert quick.excluded_layers == (0,) and quick.recommended_layer != 0  # window 1
    best = quick.effects["mlp"][2, 1:].argmax().item() + 1
    assert quick.recommended_layer == best


def test_locate_threshold_skips_and_reports(tiny_gptj):
    with pytest.raises(ValueError, match="all 4 cases were skipped"):
        locate(tiny_gptj, TEMPLATE, NAMES, min_effect=0.5, progress=False)


def test_sequential_family_may_use_layer_zero(tokenizer):
    lm = make_tiny("gpt2", tokenizer)
    result = locate(lm, TEMPLATE, NAMES, min_effect=-1.0, progress=False, kinds=["mlp"])
    assert result.excluded_layers == ()
    assert result.recommended_layer == int(result.effects["mlp"][2].argmax())


# --- CLI -------------------------------------------------------------------------------------

@pytest.fixture
def saved_gptj(tmp_path, tokenizer):
    path = tmp_path / "tiny-gptj"
    make_tiny("gptj", tokenizer).model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_locate_cli_end_to_end(saved_gptj, tmp_path, capsys):
    out = tmp_path / "locate"
    code = main(["locate", "--model", str(saved_gptj), "--n", "6", "--min-effect", "-1",
                 "--out", str(out)])
    assert code == 0
    record = json.loads((out / "trace.json").read_text())
    assert record["recommended_layer"] >= 1
    assert record["n_cases"] + record["n_skipped"] == 6
    assert record["window"] == 1 and record["noise_std"] > 0
    assert record["effects"]["mlp"]["rows"] == list(ROLES)
    for name in ("average_hidden", "average_mlp", "average_attn", "last_subject_by_layer"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "recommended edit layer" in capsys.readouterr().out


def test_trace_cli_and_errors(saved_gptj, tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(saved_gptj), "--prompt", TEMPLATE, "--subject",
                 "Brittany", "--answer", " Female", "--kinds", "mlp", "--out", str(out)]) == 0
    record = json.loads((out / "trace.json").read_text())
    assert record["answer"] == " Female" and set(record["effects"]) == {"mlp"}
    assert (record["n_cases"], record["n_skipped"]) == (1, 0)
    assert (out / "trace_mlp.png").exists()
    bad = tmp_path / "bad"
    for extra in (["--window", "9"], ["--subject", "Tiffany"], ["--answer", " Brittany"],
                  ["--noise", "loud"]):
        argv = ["trace", "--model", str(saved_gptj), "--prompt", "Name: Brittany. Gender:",
                "--subject", "Brittany", "--out", str(bad), *extra]
        assert main(argv) == 2
        assert not bad.exists()
    assert main(["locate", "--model", str(saved_gptj), "--prompt", "{} is a", "--out",
                 str(bad)]) == 2
    assert "--candidates" in capsys.readouterr().err
