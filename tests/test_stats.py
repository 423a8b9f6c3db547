"""Second-moment statistics: streaming = full batch, early stop, files, cache, solves, CLI."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch
from conftest import FAMILIES, make_tiny
from safetensors.torch import save_file

from rome_edit.cli.main import main
from rome_edit.models.architectures import get_module, mlp_widths
from rome_edit.models.hooks import capture
from rome_edit.models.loading import load_model
from rome_edit.stats import cache as cache_module
from rome_edit.stats import second_moment as sm_module
from rome_edit.stats.cache import cached_second_moment
from rome_edit.stats.corpus import CorpusError, bundled_corpus, resolve_corpus
from rome_edit.stats.inverse import InverseSecondMoment, SingularSecondMomentError, solve
from rome_edit.stats.second_moment import (
    SecondMoment,
    SecondMomentAccumulator,
    StatsFileError,
    StatsMismatchError,
    compute_second_moment,
)

DOCS = [
    "Name: Brittany. Gender: Female. Age: 31. City: Paris.",
    "The weather in Oslo was cold today.",
    "Christopher said that he was tired.",
    "Ani",
    "Record for Ani: female, lives in Rome. She works as a baker and likes tea and chess.",
    "A teacher from Lima wrote about the bridge.",
    "Name: Tom. Gender: Male.",
    "The new museum opened in Berlin last week, and many people visited it on Sunday.",
    "Lisbon",
    "Everyone says she is kind.",
    "Many people visit the park near Cairo every year.",
]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS[:6]) + "\n\n" + "\n".join(DOCS[6:]) + "\n")  # a blank line
    return path


def full_batch_moment(lm, layer: int, docs: list[str]) -> tuple[torch.Tensor, int]:
    """Ground truth: each document alone through the whole model, keys stacked, kᵀk / N."""
    name = lm.arch.out_proj.format(layer)
    keys = []
    for doc in docs:
        ids = lm.tokenizer(doc, return_tensors="pt")["input_ids"]
        with capture(lm.model, [name], inputs=True, outputs=False) as rec, torch.no_grad():
            lm.model(input_ids=ids)
        keys.append(rec.inputs[name][0].double())
    stacked = torch.cat(keys)
    return stacked.T @ stacked / len(stacked), len(stacked)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 7])
def test_streaming_equals_full_batch(tokenizer, corpus_file, family, batch_size):
    lm = make_tiny(family, tokenizer)
    expected, n_tokens = full_batch_moment(lm, 1, DOCS)
    stats = compute_second_moment(lm, 1, resolve_corpus(corpus_file), batch_size=batch_size,
                                  progress=False)
    _, d_mlp = mlp_widths(lm.model, lm.arch)
    assert stats.matrix.shape == (d_mlp, d_mlp)  # GPT-2's Conv1D too: the key is d_mlp wide
    assert stats.matrix.dtype == torch.float32
    assert (stats.n_tokens, stats.n_documents) == (n_tokens, len(DOCS))
    assert (stats.model_identity, stats.layer) == (lm.identity, 1)
    torch.testing.assert_close(stats.matrix.double(), expected, rtol=1e-5, atol=1e-6)


def test_float64_option_and_n_samples(tiny_gptj, corpus_file):
    expected, _ = full_batch_moment(tiny_gptj, 2, DOCS[:4])
    stats = compute_second_moment(tiny_gptj, 2, resolve_corpus(corpus_file), n_samples=4,
                                  dtype="float64", batch_size=3, progress=False)
    assert stats.matrix.dtype == torch.float64 and stats.dtype == "float64"
    assert stats.n_documents == 4
    torch.testing.assert_close(stats.matrix, expected, rtol=1e-6, atol=1e-6)


def test_documents_are_truncated_to_max_length(tiny_gptj, corpus_file):
    stats = compute_second_moment(tiny_gptj, 0, resolve_corpus(corpus_file), max_length=3,
                                  progress=False)
    lengths = [len(tokenizer_ids) for tokenizer_ids in tiny_gptj.tokenizer(DOCS)["input_ids"]]
    assert stats.n_tokens == sum(min(n, 3) for n in lengths)


def test_forward_stops_at_the_layer(tiny_model, corpus_file):
    lm, layer = tiny_model, 1
    fired: list[str] = []
    later = [lm.arch.block.format(layer + 1), lm.arch.final_norm, lm.arch.lm_head,
             lm.arch.mlp.format(layer)]  # the MLP never finishes: the stop is inside it
    handles = [get_module(lm.model, n).register_forward_hook(lambda *a, n=n: fired.append(n))
               for n in [*later, lm.arch.out_proj.format(layer)]]
    try:
        compute_second_moment(lm, layer, resolve_corpus(corpus_file), batch_size=4,
                              progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert set(fired) == {lm.arch.out_proj.format(layer)}
    assert len(fired) == 3  # 11 documents in batches of 4


def test_accumulator_equals_full_batch():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 6, generator=gen)
    exact = keys.double().T @ keys.double() / 50
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        acc = SecondMomentAccumulator(6, dtype)
        for chunk in keys.split([1, 7, 30, 12]):
            acc.update(chunk)
        torch.testing.assert_close(acc.matrix.double(), exact, rtol=tol, atol=tol)
        assert acc.n_tokens == 50
    with pytest.raises(ValueError, match="width"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="no keys"):
        _ = SecondMomentAccumulator(6).matrix


def _stats(matrix: torch.Tensor, identity="tiny@abc", layer=1) -> SecondMoment:
    return SecondMoment(matrix, identity, layer, "file:x.txt:123", 4, 40, "float32")


def test_save_load_round_trip(tmp_path, tiny_gptj, corpus_file):
    stats = compute_second_moment(tiny_gptj, 1, resolve_corpus(corpus_file), progress=False)
    path = stats.save(tmp_path / "sub" / "c.safetensors")
    loaded = SecondMoment.load(path, tiny_gptj.identity, 1, stats.d_mlp)
    assert torch.equal(loaded.matrix, stats.matrix)
    for field in ("model_identity", "layer", "corpus_id", "n_documents", "n_tokens", "dtype"):
        assert getattr(loaded, field) == getattr(stats, field)
    assert not list(path.parent.glob("*.tmp"))


def test_load_errors(tmp_path, tokenizer):
    good = _stats(torch.eye(4))
    path = good.save(tmp_path / "c.safetensors")
    with pytest.raises(StatsMismatchError, match=r"layer 1 but editing model other@def layer 1"):
        SecondMoment.load(path, model="other@def")
    with pytest.raises(StatsMismatchError,
                       match=r"tiny@abc layer 1 but editing model tiny@abc layer 3: recompute "
                             r"them with rome_edit.stats.compute_second_moment\(lm, layer=3\)"):
        SecondMoment.load(path, layer=3)
    with pytest.raises(StatsMismatchError, match="4×4 but the keys of this model are 8 wide"):
        SecondMoment.load(path, d_mlp=8)
    # The same weights under another name (hub id vs local copy) are the same model.
    SecondMoment.load(path, model="/some/local/copy@abc", layer=1, d_mlp=4)

    nan = torch.eye(4)
    nan[1, 2] = float("nan")
    with pytest.raises(StatsFileError, match="NaN/Inf"):
        SecondMoment.load(_stats(nan).save(tmp_path / "nan.safetensors"))
    inf = torch.eye(4)
    inf[0, 0] = float("inf")
    with pytest.raises(StatsFileError, match="NaN/Inf"):
        SecondMoment.load(_stats(inf).save(tmp_path / "inf.safetensors"))

    meta = {"format": sm_module.FORMAT, "model_identity": "m@a", "layer": "1", "corpus_id": "c",
            "n_documents": "1", "n_tokens": "1", "dtype": "float32", "d_mlp": "3"}
    save_file({"second_moment": torch.zeros(3, 4)}, tmp_path / "rect.safetensors", metadata=meta)
    with pytest.raises(StatsFileError, match="not square"):
        SecondMoment.load(tmp_path / "rect.safetensors")
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(StatsFileError, match="no rome_edit second moment"):
        SecondMoment.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match=r"compute_second_moment\(lm, layer=L\)"):
        SecondMoment.load(tmp_path / "missing.safetensors")


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "unpickled"
    for name, write in (("stats.pt", lambda p: torch.save({"x": _Boom(marker)}, p)),
                        ("stats.pkl", lambda p: p.write_bytes(pickle.dumps(_Boom(marker))))):
        path = tmp_path / name
        write(path)
        with pytest.raises(StatsFileError, match="never unpickles"):
            SecondMoment.load(path)
    assert not marker.exists()


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = _stats(torch.eye(3)).save(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    import rome_edit.storage as storage_module  # where the atomic write lives

    monkeypatch.setattr(storage_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _stats(2 * torch.eye(3)).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_cache_never_recomputes(tiny_gptj, corpus_file, tmp_path, monkeypatch, caplog):
    calls = []
    tiny_gptj.model.register_forward_pre_hook(lambda *a: calls.append(1))
    corpus = resolve_corpus(corpus_file)
    first = cached_second_moment(tiny_gptj, 1, corpus, batch_size=5, cache_dir=tmp_path,
                                 progress=False)
    assert not first.cache_hit and len(calls) == 3 and first.path.parent == tmp_path
    with caplog.at_level("INFO", logger="rome_edit.stats.cache"):
        second = cached_second_moment(tiny_gptj, 1, corpus, batch_size=2, cache_dir=tmp_path,
                                      progress=False)
    assert second.cache_hit and len(calls) == 3 and "cache hit" in caplog.text
    assert second.path == first.path and torch.equal(second.stats.matrix, first.stats.matrix)
    assert second.stats.n_tokens == first.stats.n_tokens
    # Any change to the key recomputes into another file.
    for change in ({"layer": 2}, {"n_samples": 5}, {"dtype": "float64"}, {"max_length": 4}):
        args = {"layer": 1, **change}
        other = cached_second_moment(tiny_gptj, corpus=corpus, cache_dir=tmp_path,
                                     progress=False, **args)
        assert not other.cache_hit and other.path != first.path
    # The environment variable sets the default folder.
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "env"))
    third = cached_second_moment(tiny_gptj, 1, corpus, progress=False)
    assert third.path.parent == tmp_path / "env" and not third.cache_hit


def test_solve_matches_torch_linalg_solve():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    c = a.T @ a / 40
    keys = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    inverse = InverseSecondMoment.from_matrix(c)
    assert inverse.method == "cholesky"
    torch.testing.assert_close(inverse.solve(keys), torch.linalg.solve(c, keys.T).T)
    torch.testing.assert_close(inverse.solve(keys[0]), torch.linalg.solve(c, keys[0]))
    torch.testing.assert_close(solve(c, keys[1]), torch.linalg.solve(c, keys[1]))
    # float32 keys come back float32; the ridge is relative to mean(diag C).
    ridged = c + 0.1 * c.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    out = solve(c, keys[2].float(), ridge=0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.linalg.solve(ridged, keys[2]).float())
    # On a SecondMoment the factorisation is computed once and reused.
    stats = _stats(c.float())
    assert stats.inverse() is stats.inverse() and stats.inverse(0.1) is not stats.inverse()
    torch.testing.assert_close(solve(stats, keys[3]), torch.linalg.solve(c, keys[3]),
                               rtol=1e-5, atol=1e-5)


def test_singular_second_moment_needs_a_ridge():
    c = torch.diag(torch.tensor([1.0, 2.0, 0.0]))  # a key component that is always zero
    with pytest.raises(SingularSecondMomentError, match="ridge"):
        InverseSecondMoment.from_matrix(c)
    out = solve(c, torch.ones(3), ridge=1e-3)
    torch.testing.assert_close(out, torch.ones(3) / (c.diagonal() + 1e-3))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        solve(c, torch.ones(3), ridge=-1.0)


def test_corpus_sources(tmp_path, corpus_file):
    lines = resolve_corpus(corpus_file)
    assert list(lines) == DOCS and list(lines) == DOCS  # re-iterable, blank line skipped
    whole = resolve_corpus(corpus_file, whole_file=True)
    assert len(list(whole)) == 1 and whole.corpus_id != lines.corpus_id
    assert lines.corpus_id.startswith("file:corpus.txt:")
    assert resolve_corpus(corpus_file).corpus_id == lines.corpus_id
    corpus_file.write_text("other text\n")
    assert resolve_corpus(corpus_file).corpus_id != lines.corpus_id

    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in (("b.txt", "second doc"), ("a.txt", "first doc"), ("c.md", "ignored")):
        (folder / name).write_text(text)
    docs = resolve_corpus(folder)
    assert list(docs) == ["first doc", "second doc"]
    assert docs.corpus_id.startswith("folder:docs:")

    bundled = bundled_corpus()
    assert bundled.corpus_id == resolve_corpus("bundled").corpus_id
    assert bundled.corpus_id.startswith("bundled-corpus:seed0:")
    assert next(iter(bundled)) == next(iter(resolve_corpus(None)))

    with pytest.raises(CorpusError, match="does not exist"):
        resolve_corpus(tmp_path / "nope.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        resolve_corpus(tmp_path / "sub")
    with pytest.raises(CorpusError, match="folder"):
        resolve_corpus(folder, whole_file=True)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="empty"):
        resolve_corpus(tmp_path / "empty.txt")


def test_hf_corpus_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusError, match="pip install datasets"):
        resolve_corpus("hf:wikitext:wikitext-103-raw-v1")


def test_cli_writes_a_loadable_file(tmp_path, tokenizer, corpus_file, capsys):
    lm = make_tiny("gpt2", tokenizer)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "stats_l1.safetensors"
    argv = ["stats", "--model", str(model_dir), "--layer", "1", "--out", str(out), "--corpus",
            str(corpus_file), "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "miss" in printed and "condition number" in printed
    stats = SecondMoment.load(out, layer=1, d_mlp=mlp_widths(lm.model, lm.arch)[1])
    assert stats.n_documents == len(DOCS) and stats.model_identity.startswith(str(model_dir))
    assert stats.model_identity == load_model(model_dir).identity
    out.unlink()
    assert main(argv) == 0 and "hit" in capsys.readouterr().out and out.exists()

    bad = tmp_path / "bad.safetensors"
    assert main([*argv[:4], "9", "--out", str(bad), *argv[7:]]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err and not bad.exists()
    assert main([*argv[:8], str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_accumulates_in_float32(tokenizer, corpus_file, dtype):
    """Keys of a half-precision model are summed in float32; C is close to the float32 model's."""
    from rome_edit.models.loading import wrap_model

    lm32 = make_tiny("gptj", tokenizer)
    lm16 = wrap_model(make_tiny("gptj", tokenizer).model.to(dtype), tokenizer, "tiny-half")
    corpus = resolve_corpus(str(corpus_file))
    c32 = compute_second_moment(lm32, 1, corpus, progress=False)
    c16 = compute_second_moment(lm16, 1, corpus, progress=False)
    assert c16.matrix.dtype == torch.float32 and c16.dtype == "float32"
    assert c16.n_tokens == c32.n_tokens
    assert ((c16.matrix - c32.matrix).norm() / c32.matrix.norm()).item() < 0.05


def test_cli_sampled_corpus_samples_from_the_model_once(tmp_path, tokenizer, capsys):
    lm = make_tiny("gpt2", tokenizer)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "c.safetensors"
    argv = ["stats", "--model", str(model_dir), "--layer", "1", "--out", str(out), "--corpus",
            "sampled:3", "--n-samples", "6", "--batch-size", "3", "--cache-dir",
            str(tmp_path / "cache")]
    assert main(argv) == 0
    assert "miss" in capsys.readouterr().out
    stats = SecondMoment.load(out)
    assert stats.n_documents == 6 and stats.corpus_id.startswith("sampled:")
    assert stats.corpus_id.endswith("seed3:len64:batch128") or ":seed3:" in stats.corpus_id
    assert main(argv) == 0 and "hit" in capsys.readouterr().out  # same text, same key
