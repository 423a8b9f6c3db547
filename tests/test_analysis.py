"""The delta analysis on synthetic deltas with a planted concept direction (no model needed)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from rome_edit.analysis.box_vector import make_concept_vector, optimise_box_vector
from rome_edit.analysis.classifier import (
    LinearProbe,
    cross_validate,
    fit_linear_probe,
    train_classifier,
)
from rome_edit.analysis.concept_vector import (
    ConceptVector,
    ConceptVectorError,
    load_concept_vector,
    save_concept_vector,
)
from rome_edit.analysis.deltas import DeltaSet, DeltaSetError, concat, load_delta_set
from rome_edit.analysis.directions import (
    DIRECTION_NAMES,
    candidate_directions,
    cosine_table,
    erasure_check,
    fit_leace,
    mean_difference,
)
from rome_edit.analysis.inlp import inlp
from rome_edit.analysis.plots import (
    ControlBand,
    FlipCurve,
    plot_delta_projection,
    plot_flip_rates,
    plot_weight_histogram,
)
from rome_edit.analysis.rlace import rlace_rank1

MODEL = "toy-gptj@0123456789ab"


@pytest.fixture(autouse=True)
def _single_thread():
    # These problems are tiny: threads only add overhead (and contend on a shared 2-core box).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def synthetic(n: int = 400, d: int = 24, separation: float = 3.0, seed: int = 0, layer: int = 1,
              model: str = MODEL) -> tuple[DeltaSet, torch.Tensor]:
    """Isotropic noise + a common offset + ±separation/2 along a planted unit direction."""
    g = torch.Generator().manual_seed(seed)
    planted = torch.randn(d, generator=g)
    planted /= planted.norm()
    labels = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g) + 5 * torch.randn(d, generator=g)
    x += (2 * labels - 1).unsqueeze(1).float() * (separation / 2) * planted
    ds = DeltaSet(x, labels, tuple(f"name{i}" for i in range(n)), model, layer)
    return ds, planted.double()


def test_classifier_separates_and_shuffled_control_is_at_chance():
    ds, _ = synthetic(separation=8.0)
    res = train_classifier(ds.deltas, ds.labels, seed=0)
    assert res.test_accuracy >= 0.98 and res.train_accuracy >= 0.98
    assert abs(res.shuffled_test_accuracy - 0.5) < 0.12
    assert (res.n_train, res.n_test) == (280, 120)
    kfold = cross_validate(ds.deltas, ds.labels, k=5, seed=0)
    assert kfold.mean >= 0.98 and abs(kfold.shuffled_mean - 0.5) < 0.1
    assert len(kfold.test_accuracies) == 5


def test_scaler_is_folded_into_raw_weights():
    ds, _ = synthetic(separation=2.0)
    x = ds.deltas.double().numpy() * np.linspace(0.1, 10, ds.width)  # uneven coordinate scales
    y = ds.labels.numpy()
    probe = fit_linear_probe(torch.from_numpy(x), ds.labels, C=0.5)
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.5, max_iter=2000).fit(scaler.transform(x), y)
    expected = ref.decision_function(scaler.transform(x))
    np.testing.assert_allclose(probe.decision(torch.from_numpy(x)).numpy(), expected, atol=1e-4)


def test_box_optimiser_respects_bounds_and_reaches_sign_w():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 30.0):  # tiny and saturating classifiers alike
        w = torch.randn(64, generator=g, dtype=torch.float64) * scale
        opt = optimise_box_vector(LinearProbe(w, bias=-0.7))
        assert opt.vector.abs().max() <= 1.0
        torch.testing.assert_close(opt.vector, torch.sign(w))
        assert opt.fraction_at_bounds == 1.0
    # The literal probability objective (the source's) stops early but stays inside the box.
    opt = optimise_box_vector(LinearProbe(w, bias=0.0), objective="probability", bound=0.5)
    assert opt.vector.abs().max() <= 0.5 and opt.probability > 0.99


def test_gender_vector_scales():
    ds, _ = synthetic()
    clf = train_classifier(ds.deltas, ds.labels)
    raw = make_concept_vector(ds.deltas, clf, "raw", **ds.provenance)
    assert raw.scale == 1.0 and raw.norm == pytest.approx(np.sqrt(ds.width))
    torch.testing.assert_close(raw.vector.double(), torch.sign(clf.weights).float().double())
    matched = make_concept_vector(ds.deltas, clf, "mean-norm", **ds.provenance)
    assert matched.norm == pytest.approx(ds.mean_norm, rel=1e-5)
    double = matched.rescaled(2.0)
    assert double.scale_mode == "multiple" and double.multiple == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(double.raw, raw.vector)
    for bad in (0.0, -1.0, float("nan"), "large"):
        with pytest.raises(ConceptVectorError):
            matched.rescaled(bad)


def test_gender_vector_file_round_trip_and_bad_files(tmp_path):
    ds, _ = synthetic()
    vec = make_concept_vector(ds.deltas, train_classifier(ds.deltas, ds.labels), 1.5,
                              **ds.provenance)
    path = save_concept_vector(vec, tmp_path / "vectors" / "gender.safetensors")
    back = load_concept_vector(path, expected_width=ds.width)
    assert torch.equal(back.vector, vec.vector)
    for field in ("scale_mode", "scale", "raw_norm", "model_identity", "layer",
                  "classifier_test_accuracy", "mean_delta_norm"):
        assert getattr(back, field) == getattr(vec, field)
    back.check_compatible(MODEL, 1, ds.width)
    assert back.to_json()["norm"] == pytest.approx(1.5 * ds.mean_norm, rel=1e-5)
    with pytest.raises(ConceptVectorError, match="width"):
        load_concept_vector(path, expected_width=ds.width + 1)
    with pytest.raises(ConceptVectorError, match="layer 1, not 2"):
        back.check_compatible(MODEL, 2, ds.width)
    with pytest.raises(ConceptVectorError, match="model"):
        back.check_compatible("other@ffff", 1, ds.width)

    # A pickle offered as a vector is refused without being unpickled.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "vector.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConceptVectorError, match="pickle"):
        load_concept_vector(bad)
    assert not marker.exists()
    torch.save({"vector": vec.vector}, tmp_path / "zip.pt")
    with pytest.raises(ConceptVectorError, match="never unpickles"):
        load_concept_vector(tmp_path / "zip.pt")
    (tmp_path / "text.safetensors").write_text("not a tensor file at all")
    with pytest.raises(ConceptVectorError, match="not a safetensors file"):
        load_concept_vector(tmp_path / "text.safetensors")
    save_file({"vector": torch.ones(3)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ConceptVectorError, match="format"):
        load_concept_vector(tmp_path / "bare.safetensors")
    with pytest.raises(FileNotFoundError):
        load_concept_vector(tmp_path / "missing.safetensors")
    with pytest.raises(ConceptVectorError, match="NaN"):
        ConceptVector(torch.tensor([1.0, float("nan")]), "raw", 1.0, 1.0, MODEL, 1, 1.0, 1.0)


def test_leace_erasure_leaves_a_probe_at_chance():
    ds, _ = synthetic(n=600, separation=6.0)
    dirs = candidate_directions(ds.deltas, ds.labels, seed=0, inlp_iterations=4, rlace_steps=60)
    rows = {r.name: r for r in erasure_check(ds.deltas, ds.labels, dirs, seed=0)}
    assert rows["leace"].accuracy_before > 0.95
    assert abs(rows["leace"].accuracy_after - 0.5) < 0.1
    assert rows["random"].accuracy_after > 0.9  # removing a random direction changes nothing
    assert abs(rows["mean-difference"].accuracy_after - 0.5) < 0.1
    # The eraser itself: a probe on all erased rows learns nothing even on its training data.
    erased = fit_leace(ds.deltas, ds.labels).eraser(ds.deltas.double())
    probe = fit_linear_probe(erased, ds.labels)
    assert abs(probe.accuracy(erased, ds.labels) - 0.5) < 0.1


def test_delta_set_methods_are_the_estimators_on_its_rows():
    """``ds.probe()``, ``ds.box_vector()`` and ``ds.directions()`` (the public convenience
    methods) give exactly what the tensor functions give on ``(ds.deltas, ds.labels)``."""
    ds, _ = synthetic(n=120)
    clf = train_classifier(ds.deltas, ds.labels, seed=3)
    probe = ds.probe(seed=3)
    assert torch.equal(probe.weights, clf.weights) and probe.to_json() == clf.to_json()
    vec = ds.box_vector(1.5, seed=3)
    ref = make_concept_vector(ds.deltas, clf, 1.5, **ds.provenance)
    assert torch.equal(vec.vector, ref.vector) and vec.to_json() == ref.to_json()
    assert (vec.model_identity, vec.layer, vec.classes) == (ds.model_identity, ds.layer,
                                                            ds.classes)
    dirs = ds.directions(seed=3, inlp_iterations=2, rlace_steps=10)
    again = candidate_directions(ds.deltas, ds.labels, seed=3, inlp_iterations=2, rlace_steps=10)
    assert torch.equal(dirs.vectors, again.vectors)
    assert (dirs.model_identity, dirs.layer) == (ds.model_identity, ds.layer)


def test_directions_recover_the_planted_direction():
    ds, planted = synthetic(n=600, separation=3.0)
    dirs = candidate_directions(ds.deltas, ds.labels, seed=0, inlp_iterations=4, rlace_steps=80)
    assert dirs.names == DIRECTION_NAMES
    torch.testing.assert_close(dirs.vectors.norm(dim=1), torch.ones(6, dtype=torch.float64))
    for name in ("inlp", "rlace", "mean-difference", "classifier", "leace"):
        assert float(dirs[name] @ planted) > 0.9, name
    # Theory (rlace.py): rank-1 R-LACE and the LEACE image are the mean difference of the fit rows.
    table = cosine_table(dirs.as_dict())
    assert table("rlace", "mean-difference") > 0.99
    assert table("leace", "mean-difference") > 0.99
    assert table("box", "box") == pytest.approx(1.0)
    assert table("inlp", "rlace") == pytest.approx(table("rlace", "inlp"))
    # The INLP projection removes exactly the directions found.
    p = dirs.inlp.projection()
    torch.testing.assert_close(p @ p, p)
    assert float((dirs.inlp.directions @ p).abs().max()) < 1e-10
    assert dirs.inlp.test_accuracies[0] > 0.85


def test_rlace_and_inlp_on_their_own():
    ds, planted = synthetic(n=500, d=16, separation=4.0, seed=3)
    res = rlace_rank1(ds.deltas, ds.labels, seed=1, n_steps=80)
    assert abs(float(res.direction @ planted)) > 0.95
    assert res.loss_after == pytest.approx(np.log(2), abs=0.01) and res.loss_before < 0.3
    md = mean_difference(ds.deltas, ds.labels)
    assert abs(float(res.direction @ md / md.norm())) > 0.99
    first = inlp(ds.deltas, ds.labels, n_iterations=2, seed=0)
    assert abs(float(first.first_direction @ planted)) > 0.9


def test_delta_set_bad_input_is_refused():
    ds, _ = synthetic(n=20)
    with pytest.raises(DeltaSetError, match="different layers"):
        concat([ds, synthetic(n=20, layer=2)[0]])
    with pytest.raises(DeltaSetError, match="different models"):
        concat([ds, synthetic(n=20, model="gpt2@ffffffffffff")[0]])
    assert concat([ds, synthetic(n=10, seed=1)[0]]).n == 30
    one_class = ds.subset(ds.labels == 1)
    with pytest.raises(DeltaSetError, match="each label"):
        train_classifier(one_class.deltas, one_class.labels, classes=one_class.classes)
    with pytest.raises(DeltaSetError, match="each label"):
        one_class.probe()
    bad = ds.deltas.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(DeltaSetError, match="NaN or inf"):
        DeltaSet(bad, ds.labels, ds.subjects, MODEL, 1)
    with pytest.raises(DeltaSetError, match=r"\{0, 1\}"):
        DeltaSet(ds.deltas, ds.labels + 1, ds.subjects, MODEL, 1)
    with pytest.raises(DeltaSetError, match="2-D"):
        DeltaSet(ds.deltas[0], ds.labels[:1], ds.subjects[:1], MODEL, 1)
    with pytest.raises(DeltaSetError, match="subjects"):
        DeltaSet(ds.deltas, ds.labels, ds.subjects[:-1], MODEL, 1)


def _write_sweep(root, ds, genders):
    root.mkdir()
    save_file({"delta": ds.deltas, "v_orig": torch.zeros_like(ds.deltas)},
              str(root / "deltas.safetensors"), metadata={"model_identity": MODEL, "layer": "3"})
    with (root / "records.jsonl").open("w") as f:
        for subject, gender in zip(ds.subjects, genders, strict=True):
            other = "male" if gender == "female" else "female"
            f.write(json.dumps({"subject": subject, "gender": gender, "target": other}) + "\n")
    (root / "summary.json").write_text(json.dumps({"model_identity": MODEL, "layer": 3}))


def test_load_delta_set_from_a_sweep_directory(tmp_path):
    ds, _ = synthetic(n=12)
    genders = ["female" if i % 3 == 0 else "male" for i in range(12)]
    _write_sweep(tmp_path / "sweep", ds, genders)
    back = load_delta_set(tmp_path / "sweep")
    assert torch.equal(back.deltas, ds.deltas) and back.subjects == ds.subjects
    assert back.labels.tolist() == [int(g == "female") for g in genders]
    assert (back.model_identity, back.layer) == (MODEL, 3)

    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps(summary | {"layer": 4}))
    with pytest.raises(DeltaSetError, match="different sweeps"):
        load_delta_set(tmp_path / "sweep")
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "sweep" / "records.jsonl").write_text(
        (tmp_path / "sweep" / "records.jsonl").read_text().split("\n", 1)[1])
    with pytest.raises(DeltaSetError, match="one delta row per record"):
        load_delta_set(tmp_path / "sweep")
    with pytest.raises(FileNotFoundError, match="sweep"):
        load_delta_set(tmp_path / "nowhere")
    (tmp_path / "sweep" / "deltas.safetensors").write_bytes(pickle.dumps({"delta": [1.0]}))
    with pytest.raises(DeltaSetError, match="safetensors"):
        load_delta_set(tmp_path / "sweep")


def test_plots_write_pngs(tmp_path):
    ds, planted = synthetic(n=100)
    clf = train_classifier(ds.deltas, ds.labels)
    files = [
        plot_delta_projection(ds.deltas, ds.labels, clf.weights, tmp_path / "proj.png",
                              classes=ds.classes, layer=ds.layer),
        plot_weight_histogram(clf.weights, tmp_path / "weights.png"),
        plot_flip_rates(
            [FlipCurve("box", (0.5, 1.0, 2.0), (0.1, 0.5, 0.9)),
             FlipCurve("mean-difference", (0.5, 1.0, 2.0), (0.2, 0.6, 1.0))],
            ControlBand((0.5, 1.0, 2.0), ((0.0, 0.1, 0.2), (0.05, 0.1, 0.3))),
            tmp_path / "flips" / "rates.png", title="F→M"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one rate per scale"):
        FlipCurve("box", (0.5, 1.0), (0.1,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ControlBand((1.0,), ((1.5,),))
