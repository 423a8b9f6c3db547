"""The arithmetic behind scripts/measure_paraphrase_{position,levers}.py (docs/real-model.md):
the several-key write they use must be ROME's update for one key and exact at every key."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rome_edit.rome.update import rank_one_update

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stats():
    g = torch.Generator().manual_seed(0)
    d_mlp, d_model = 12, 5
    a = torch.randn(d_mlp, 40, generator=g, dtype=torch.float64)
    c = a @ a.T / 40  # a second moment, full rank
    weight = torch.randn(d_model, d_mlp, generator=g, dtype=torch.float64)
    keys = torch.randn(3, d_mlp, generator=g, dtype=torch.float64)
    values = torch.randn(3, d_model, generator=g, dtype=torch.float64)
    return c, torch.linalg.inv(c), weight, keys, values


def test_one_key_is_romes_rank_one_update(stats):
    c, c_inv, weight, keys, values = stats
    k, v = keys[0], values[0]
    got = load("measure_paraphrase_position").rank_two_update(
        k[None], (v - weight @ k)[None], c_inv)
    ref = rank_one_update("paper", c_inv @ k, k, v, weight @ k).matrix(transposed=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_several_keys_are_exact_and_of_minimum_c_norm(stats):
    c, c_inv, weight, keys, values = stats
    residuals = values - keys @ weight.T
    update = load("measure_paraphrase_position").rank_two_update(keys, residuals, c_inv)
    torch.testing.assert_close(keys @ update.T, residuals, rtol=1e-9, atol=1e-10)
    # Minimum tr(ΔW C ΔWᵀ) among exact solutions: ΔW C lies in the row space of the keys, so
    # adding any N with N kᵢ = 0 only grows the norm.
    coeffs = torch.linalg.lstsq(keys.T, (update @ c).T).solution
    torch.testing.assert_close(coeffs.T @ keys, update @ c, rtol=1e-9, atol=1e-9)
    null = torch.linalg.svd(keys).Vh[3:]  # rows orthogonal to every key
    other = update + torch.randn(update.shape[0], null.shape[0], dtype=torch.float64) @ null
    torch.testing.assert_close(keys @ other.T, residuals, rtol=1e-9, atol=1e-9)
    assert torch.trace(other @ c @ other.T) > torch.trace(update @ c @ update.T)


def test_protected_metric_spares_the_other_names_but_not_the_edited_one(stats):
    from rome_edit.forms.protected_keys import ProtectedKeyBank
    from rome_edit.stats.inverse import InverseSecondMoment

    c, c_inv, weight, keys, values = stats
    levers = load("measure_paraphrase_levers")
    others = torch.randn(4, c.shape[0], generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    # The edited name owns a bank row equal to its own key: it must not be protected.
    bank = ProtectedKeyBank("other-names", "{}", 0, ("me", "a", "a", "b", "c"),
                            torch.cat([keys[:1], others]).float(), (0,) * 5, "all")
    metric = levers.Metrics(InverseSecondMoment.from_matrix(c), c.shape[0], bank)
    residuals = values[:2] - keys[:2] @ weight.T
    update = load("measure_paraphrase_position").rank_two_update(keys[:2], residuals,
                                                                 metric("me"))
    torch.testing.assert_close(keys[:2] @ update.T, residuals, rtol=1e-6, atol=1e-6)
    assert (others.float().double() @ update.T).abs().max() < 1e-6 * residuals.abs().max()
    plain = levers.Metrics(InverseSecondMoment.from_matrix(c), c.shape[0], None)
    torch.testing.assert_close(plain("me"), c_inv, rtol=1e-8, atol=1e-10)
