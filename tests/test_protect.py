"""Protected updates, many edits in one layer, and saved edited checkpoints (tiny models)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rome_edit.forms.many import batched_delta, vector_targets, write_edits
from rome_edit.forms.protect import (
    ProtectedDirections,
    ProtectSettings,
    protected_direction,
)
from rome_edit.forms.protected_keys import (
    Protection,
    build_bank,
    protect_records,
    read_names_file,
)
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import prompt_keys
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.weights.persist import MANIFEST, load_persisted, save_edited
from rome_edit.weights.targets import EditTargets
from rome_edit.weights.write import add_rank_one, preserved

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
PROMPT = "Name: {}. Gender:"
NEIGHBOURS = ["David", "Christopher", "Ani", "Brittney", "Tiffany", "Anna", "Daniel"]


def _inverse(lm, layer=1, seed=0):
    d_mlp = out_proj_weight(lm.model, lm.arch, layer).shape[1 - int(lm.arch.out_proj_transposed)]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_mlp, d_mlp, generator=g)
    c = (a @ a.T / d_mlp + torch.eye(d_mlp)).double()
    # a float32 A·Aᵀ is not bitwise symmetric on every BLAS kernel (MKL's AVX2 path: 6e-8),
    # and the Cholesky factor keeps only the lower triangle: symmetrise so both sides use one C
    c = (c + c.T) / 2
    prov = {"model_identity": lm.identity, "layer": layer, "d_mlp": d_mlp}
    return InverseSecondMoment.from_matrix(c).with_provenance(prov), c


def _hp(lm):
    return ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=5,
                           mom2_adjustment=True)


@pytest.fixture
def edited(tiny_gptj):
    lm = tiny_gptj
    inverse, c = _inverse(lm)
    req = EditRequest("Brittany", PROMPT, " Male", " Female")
    (record,) = compute_edits(lm, [req], _hp(lm), CTX, inverse, progress=False)
    return lm, inverse, c, record


@pytest.mark.parametrize("form", ["hard", "null-space"])
def test_protected_keys_do_not_move_while_k_star_maps_to_v_star(edited, form):
    lm, inverse, c, record = edited
    bank = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names")
    settings = ProtectSettings(form, threshold=0.0)
    (prot,) = protect_records(lm, [record], Protection(bank, settings), inverse)
    out_before = layer_output(lm, 1, bank.keys)
    with preserved(lm, [1]):
        add_rank_one(lm, 1, record.u, record.lam)  # unprotected: the neighbours move
        moved = (layer_output(lm, 1, bank.keys) - out_before).abs().max().item()
    with preserved(lm, [1]):
        add_rank_one(lm, 1, prot.u, prot.lam)
        kept = (layer_output(lm, 1, bank.keys) - out_before).abs().max().item()
        v_k_star = layer_output(lm, 1, prot.k_star[None])[0]
    assert moved > 1e-2
    assert kept < 1e-5, kept
    assert (v_k_star - prot.v_star).norm() / prot.v_star.norm() < 1e-5
    assert torch.equal(prot.delta, record.delta)  # the recorded delta does not depend on form
    assert prot.protection["form"] == form
    assert prot.protection["names"] == NEIGHBOURS and prot.protection["n_keys"] == 7


def test_hard_direction_is_the_closed_form(edited):
    lm, inverse, c, record = edited
    keys = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names").keys
    u = protected_direction(record.k_star, keys, ProtectSettings("hard"), inverse)
    big_k = torch.cat([record.k_star[None], keys]).double().T  # d × (m+1)
    c_inv = torch.linalg.inv(c)
    e1 = torch.zeros(big_k.shape[1], dtype=torch.float64)
    e1[0] = 1
    expected = c_inv @ big_k @ torch.linalg.solve(big_k.T @ c_inv @ big_k, e1)
    assert torch.allclose(u.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    # the soft form tends to the hard form as its weight grows; with no keys it is ROME's u
    soft = protected_direction(record.k_star, keys, ProtectSettings("soft", weight=1e9),
                               inverse)
    # Both are solved in float64 and rounded to float32 once, and at weight 1e9 they differ
    # analytically by O(1/weight): the gap is float32 rounding, ≤ ε32 relative (2 roundings of
    # ε32/2); 4·ε32 leaves room for the float64 solves. (A float32 cosine cannot resolve this.)
    eps32 = torch.finfo(torch.float32).eps
    assert (soft.double() - u.double()).norm() / u.double().norm() < 4 * eps32
    plain = protected_direction(record.k_star, keys[:0], ProtectSettings("hard"), inverse)
    paper = record.u / torch.dot(record.u, record.k_star)
    assert torch.allclose(plain, paper, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("d", "n", "keep_from"), [
    (128, 100, 1),  # fewer keys than d: Schur complement in key-count space
    (48, 100, 3),  # more keys than d: Woodbury downdate in key space
    (48, 200, 140),  # more keys than d, most of the bank excluded: solved directly
])
def test_soft_downdate_equals_direct_solve(d, n, keep_from):
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(n, d, generator=g)
    c = torch.randn(d, d, generator=g)
    c = c @ c.T / d + torch.eye(d)
    solver = InverseSecondMoment.from_matrix(c)
    settings = ProtectSettings("soft", weight=5.0)
    dirs = ProtectedDirections(bank, settings, solver)
    k = torch.randn(d, generator=g)
    keep = torch.arange(keep_from, n)
    fast = dirs.direction(k, keep)
    direct = protected_direction(k, bank[keep], settings, solver)
    assert torch.allclose(fast, direct, rtol=1e-4, atol=1e-6)
    assert abs(torch.dot(fast, k).item() - 1) < 1e-5


def test_every_token_bank_protects_the_whole_prompt(edited):
    lm, inverse, c, record = edited
    last = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names")
    every = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names", positions="all")
    tokens = prompt_keys(lm, 1, PROMPT, NEIGHBOURS)
    assert every.keys.shape[0] == len(NEIGHBOURS) + sum(len(t) for t in tokens)
    assert torch.equal(every.keys[: len(NEIGHBOURS)], last.keys)
    assert every.subjects == tuple(NEIGHBOURS)
    # each prompt's token keys are scaled by 1/√T; every row belongs to its subject
    first = tokens[0]
    assert torch.allclose(every.keys[len(NEIGHBOURS): len(NEIGHBOURS) + len(first)],
                          first / len(first) ** 0.5)
    assert set(every.names[len(NEIGHBOURS): len(NEIGHBOURS) + len(first)]) == {NEIGHBOURS[0]}
    all_tokens = torch.cat(tokens)
    out_before = layer_output(lm, 1, all_tokens)
    moved = {}
    for label, bank, weight in (("last", last, 1.0), ("all", every, 1.0),
                                ("all-strong", every, 1e4)):
        (prot,) = protect_records(lm, [record], Protection(bank, ProtectSettings(weight=weight)),
                                  inverse)
        assert prot.protection["form"] == ("hard" if label == "last" else "soft")
        with preserved(lm, [1]):
            add_rank_one(lm, 1, prot.u, prot.lam)
            moved[label] = (layer_output(lm, 1, all_tokens) - out_before).norm().item()
            landed = layer_output(lm, 1, prot.k_star[None])[0]
        assert (landed - prot.v_star).norm() / prot.v_star.norm() < 1e-5  # k* still ↦ v*
    assert prot.protection["positions"] == "all" and prot.protection["n_keys"] == 7
    assert prot.protection["n_key_rows"] == every.keys.shape[0]
    # protecting every token moves the prompts' tokens less, the more so the larger λ
    assert moved["all-strong"] < moved["all"] < moved["last"]
    assert moved["all-strong"] < 1e-2 * moved["last"]
    with pytest.raises(ValueError, match="positions"):
        build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names", positions="first")


def test_protect_refusals(edited, tmp_path):
    lm, inverse, _, record = edited
    bank = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names")
    ref = EditRecord(**{**record.__dict__, "update_form": "rome-reference"})
    with pytest.raises(ValueError, match="paper"):
        protect_records(lm, [ref], Protection(bank))
    with pytest.raises(ValueError, match="protection form"):
        ProtectSettings("bogus")
    with pytest.raises(FileNotFoundError, match="protected names file .*: no such file"):
        build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, str(tmp_path / "nope.csv"))
    f = tmp_path / "names.csv"
    f.write_text("name,gender\nDavid,male\nAnna,female\n")
    assert read_names_file(f) == ["David", "Anna"]
    same = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "same-last-token")
    (p,) = protect_records(lm, [record], Protection(same, ProtectSettings("hard")),
                           inverse)
    assert set(p.protection["names"]) <= set(NEIGHBOURS)


def test_record_with_protection_round_trips(edited, tmp_path):
    lm, inverse, _, record = edited
    bank = build_bank(lm, 1, PROMPT, NEIGHBOURS, CTX, "other-names")
    (prot,) = protect_records(lm, [record], Protection(bank, ProtectSettings("soft")),
                             inverse)
    loaded = EditRecord.load(prot.save(tmp_path / "r"))
    assert loaded.protection == prot.protection and torch.equal(loaded.u, prot.u)
    old = json.loads((tmp_path / "r" / "record.json").read_text())
    old.pop("protection")  # a record written before protection existed still loads
    (tmp_path / "r" / "record.json").write_text(json.dumps(old))
    assert EditRecord.load(tmp_path / "r").protection is None


def _targets(lm, names=("Brittany", "David", "Ani")):
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(lm.model.config.hidden_size, generator=g)
    return vector_targets(lm, 1, list(names), vector, CTX, PROMPT)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise (Frobenius) relative difference, the measure the perturbation bounds bound."""
    return ((a - b).norm() / b.norm()).item()


def test_batched_update_equals_closed_form(tiny_gptj):
    lm = tiny_gptj
    inverse, c = _inverse(lm)
    targets = _targets(lm)
    residual = targets.v_star - layer_output(lm, 1, targets.k_star)
    before = out_proj_weight(lm.model, lm.arch, 1).detach().double().clone()
    with preserved(lm, [1]):
        write_edits(lm, targets, "batched", inverse, mom2_weight=0.5, progress=False)
        delta_w = out_proj_weight(lm.model, lm.arch, 1).detach().double() - before
    k, r = targets.k_star.double().T, residual.double().T  # d × n, d_model × n
    a = 0.5 * c + k @ k.T
    expected = r @ k.T @ torch.linalg.inv(a)
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    sqrt_d = k.shape[0] ** 0.5
    # ΔW is written into float32 weights: rounding ΔW and then W + ΔW to float32 is off by at
    # most ε32/2·(|W| + 2|ΔW|) per entry (bound doubled); the float64 solves (κ(a) ≈ 230) add
    # ≲ √d·ε·κ(a)·max|ΔW| (see below).  Measured: at most 0.48 of this bound.
    bound = (eps32 * (before.abs() + 2 * expected.abs())
             + sqrt_d * eps * torch.linalg.cond(a) * expected.abs().max())
    assert ((delta_w - expected).abs() <= bound).all()
    # n = 1: by Sherman–Morrison kᵀ(λ_C C + kkᵀ)⁻¹ = uᵀ/(λ_C + kᵀu), u = C⁻¹k, for every λ_C.
    # That side solves only with C (κ(C) ≈ 5); batched_delta solves λ_C C + kkᵀ, whose κ grows
    # like kᵀu/λ_C, so the two differ by its rounding: normwise ≲ √d·ε·κ (backward-stable
    # solve, Higham Thm 7.2, with the backward error's typical √d·ε growth; measured ≈ 0.6–0.95
    # ε·κ across λ_C).  At λ_C = 1e-9, κ ≈ 7e10: bound ≈ 1.7e-4; at 0.5 and 100 it is < 1e-12,
    # where dropping or doubling λ_C lands 1e-2 to 1 away.
    k1, r1 = targets.k_star[0].double(), residual[0].double()
    u = torch.linalg.solve(c, k1)
    for lam in (100.0, 0.5, 1e-9):
        one = batched_delta(targets.k_star[:1], residual[:1], c, lam)
        tol = sqrt_d * eps * torch.linalg.cond(lam * c + torch.outer(k1, k1)).item()
        assert _rel(one, torch.outer(r1, u) / (lam + u @ k1)) < tol, (lam, tol)
    # λ_C → 0: ROME's paper form, which maps k* to v* exactly; analytically the two differ by
    # the factor λ_C/(λ_C + kᵀu) (2.5e-11 here), the rest is the rounding bounded above
    rome = torch.outer(r1, u) / (u @ k1)
    assert _rel(one, rome) < lam / (lam + u @ k1).item() + tol


@pytest.mark.parametrize("form", ["sequential", "batched"])
def test_many_edits_with_hard_protection(tiny_gptj, form):
    lm = tiny_gptj
    inverse, _ = _inverse(lm)
    targets = _targets(lm)
    bank = build_bank(lm, 1, PROMPT, NEIGHBOURS + ["Brittany"], CTX, "other-names")
    others = torch.tensor([i for i, n in enumerate(bank.names) if n not in targets.subjects])
    out_before = layer_output(lm, 1, bank.keys[others])
    with preserved(lm, [1]):
        res = write_edits(lm, targets, form, inverse,
                          Protection(bank, ProtectSettings("hard")), mom2_weight=1e-6,
                          progress=False)
        kept = (layer_output(lm, 1, bank.keys[others]) - out_before).abs().max().item()
        landed = layer_output(lm, 1, targets.k_star)
    assert kept < 1e-5
    assert res.protection["n_keys"] == len(others) and res.n_edits == 3
    # sequential protects earlier edits too, so every edit still holds at the end
    rel = (landed - targets.v_star).norm(dim=1) / targets.v_star.norm(dim=1)
    assert rel.max() < (1e-4 if form == "sequential" else 1e-2), rel


def test_saved_checkpoint_reloads_with_identical_logits(tiny_gptj, tmp_path):
    lm = tiny_gptj
    targets = _targets(lm)
    base = lm.identity
    res = write_edits(lm, targets, "sequential", progress=False)
    out = save_edited(lm, tmp_path / "ckpt", targets, base, res.to_dict())
    ids = lm.tokenizer(["Name: Ani. Gender:", "Name: David. Gender: Male"], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        expected = lm.model(**ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(out).eval()
        got = fresh(**ids).logits
    assert torch.equal(got, expected)
    meta, loaded = load_persisted(out)
    assert meta["base_model_identity"] == base and meta["form"] == "sequential"
    assert [e["subject"] for e in meta["edits"]] == list(targets.subjects)
    assert torch.equal(loaded.delta, targets.delta)
    with pytest.raises(ValueError, match="not empty"):
        save_edited(lm, out, targets, base, res.to_dict())
    assert (out / MANIFEST).exists()
    # the edited checkpoint is not taken for the original (its later layers' statistics,
    # records and sweeps are not the original's), and the same folder always gets one identity
    reloaded = wrap_model(fresh, lm.tokenizer, str(out))
    assert not reloaded.same_model(base) and not lm.same_model(reloaded.identity)
    assert wrap_model(fresh, lm.tokenizer, str(out)).fingerprint == reloaded.fingerprint
    plain = tmp_path / "plain"
    lm.model.save_pretrained(plain)  # the same weights without the edits' files
    assert wrap_model(fresh, lm.tokenizer, str(plain)).fingerprint != reloaded.fingerprint


def test_targets_refusals(tiny_gptj):
    lm = tiny_gptj
    with pytest.raises(ValueError, match="twice"):
        _targets(lm, names=("Ani", "Ani"))
    with pytest.raises(ValueError, match="wide"):
        vector_targets(lm, 1, ["Ani"], torch.zeros(7), CTX, PROMPT)
    t = _targets(lm)
    with pytest.raises(ValueError, match="unknown form"):
        write_edits(lm, t, "parallel")  # type: ignore[arg-type]
    assert isinstance(t, EditTargets)


def test_protected_sweep_keeps_the_deltas_and_records_the_protection(tiny_gptj, tmp_path):
    from concepts import CITY, JOB, SUBJECTS
    from safetensors.torch import load_file

    from rome_edit.evaluation.sweep import run_sweep

    lm = tiny_gptj
    inverse, _ = _inverse(lm)
    names = list(SUBJECTS[:4])
    labelled = [(n, i % 2) for i, n in enumerate(names)]
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=3,
                         mom2_adjustment=True)

    def sweep(out, protection=None):
        return run_sweep(lm, CITY.requests(labelled), hp, CTX, tmp_path / out, inverse,
                         batch_size=2, labels=[label for _, label in labelled],
                         classes=CITY.classes, neighbour_pool=names, kept=[JOB],
                         progress=False, fluency_per_batch=0, protection=protection)

    plain = sweep("plain")
    bank = build_bank(lm, 1, CITY.prompt, names, CTX, "other-names")
    prot = sweep("prot", Protection(bank, ProtectSettings("hard")))
    a = load_file(str(tmp_path / "plain" / "deltas.safetensors"))
    b = load_file(str(tmp_path / "prot" / "deltas.safetensors"))
    assert torch.equal(a["delta"], b["delta"]) and not torch.equal(a["u"], b["u"])
    assert prot["protection"]["source"] == "other-names" and "protection" not in plain
    lines = (tmp_path / "prot" / "records.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(r["protect_form"] == "hard" and r["protected_keys"] == 3 for r in rows)
    assert prot["specificity"] >= plain["specificity"]
    with pytest.raises(ValueError, match="different"):  # resuming with other protection
        sweep("prot")


@pytest.mark.parametrize("argv, message", [
    (["apply", "--records", "x", "--out", "o"], "add --persist"),
    (["apply", "--vector", "v", "--persist", "--mode", "activations", "--out", "o"],
     "drop --mode"),
    (["forensics", "e", "--revert-all", "--out", "o"], "--save"),
    (["forensics", "e", "--out", "o"], "give --candidates FILE"),
    (["edit", "--subject", "Anna", "--prompt", "Name: {}.", "--target", " Male", "--protect",
      "other-names", "--out", "o"], "give --protect-names FILE"),
    (["edit", "--subject", "Anna", "--prompt", "Name: {}.", "--target", " Male", "--protect",
      "same-last-token", "--out", "o"], "give --protect-names FILE"),
    (["apply", "--records", "x", "--persist", "--many-form", "fitted", "--out", "o"],
     "writes one vector"),
])
def test_cli_refusals(argv, message, capsys, tmp_path, monkeypatch):
    from rome_edit.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_edit_protects_the_named_pool(tiny_gptj, tmp_path, capsys):
    """Generic ``edit --protect other-names`` protects the subjects of ``--protect-names``."""
    from rome_edit.cli.main import main

    model_dir = tmp_path / "model"
    tiny_gptj.model.save_pretrained(model_dir)
    tiny_gptj.tokenizer.save_pretrained(model_dir)
    ROMEHyperParams(layers=(1,), v_loss_layer=tiny_gptj.n_layers - 1, v_num_grad_steps=3,
                    mom2_adjustment=False).save(tmp_path / "hp.json")
    (tmp_path / "ctx.json").write_text(json.dumps(CTX))
    (tmp_path / "pool.txt").write_text("Anna\nDavid\nTiffany\n")
    assert main(["edit", "--subject", "Anna", "--prompt", PROMPT, "--target", " Male",
                 "--model", str(model_dir), "--hparams", str(tmp_path / "hp.json"),
                 "--context-templates", str(tmp_path / "ctx.json"), "--protect", "other-names",
                 "--protect-names", str(tmp_path / "pool.txt"), "--out",
                 str(tmp_path / "rec")]) == 0
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["protection"]["source"] == "other-names"
    assert record["protection"]["n_keys"] == 2  # David and Tiffany; never the edited subject
    assert "protected 2 keys (other-names" in capsys.readouterr().out


def test_cli_apply_records_persist(tiny_gptj, tmp_path):
    from rome_edit.cli.main import main
    from rome_edit.models.loading import load_model

    model_dir = tmp_path / "model"
    tiny_gptj.model.save_pretrained(model_dir)
    tiny_gptj.tokenizer.save_pretrained(model_dir)
    lm = load_model(model_dir)
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=3,
                         mom2_adjustment=False)
    hp.save(tmp_path / "hp.json")
    reqs = [EditRequest(s, PROMPT, " Male", " Female") for s in ("Brittany", "Anna")]
    for r in compute_edits(lm, reqs, hp, CTX, None, progress=False):
        r.save(tmp_path / r.request.subject)
    out = tmp_path / "edited"
    argv = ["apply", "--records", str(tmp_path / "Brittany"), str(tmp_path / "Anna"),
            "--persist", "--out", str(out), "--model", str(model_dir),
            "--hparams", str(tmp_path / "hp.json")]
    assert main(argv) == 0
    meta, targets = load_persisted(out)
    assert meta["form"] == "sequential" and list(targets.subjects) == ["Brittany", "Anna"]
    fresh = load_model(out)
    landed = layer_output(fresh, 1, targets.k_star)
    # sequential: the last edit lands exactly on the reloaded model (earlier ones may drift)
    assert (landed[-1] - targets.v_star[-1]).norm() / targets.v_star[-1].norm() < 1e-4
    assert main(argv) == 2  # the folder is not empty any more
    assert load_model(out).identity != lm.identity  # the checkpoint is not the original

    # batched, protecting every token of other names' prompts (auto → soft)
    (tmp_path / "protect.txt").write_text("David\nDaniel\nTiffany\n")
    out2 = tmp_path / "edited-every-token"
    argv2 = [*argv[:argv.index("--out")], "--out", str(out2), "--many-form", "batched",
             "--protect", "other-names", "--protect-positions", "all",
             "--protect-names", str(tmp_path / "protect.txt"), *argv[argv.index("--model"):]]
    assert main(argv2) == 0
    meta2, _ = load_persisted(out2)
    assert meta2["form"] == "batched"
    assert meta2["protection"]["positions"] == "all" and meta2["protection"]["form"] == "soft"
