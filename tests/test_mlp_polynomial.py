"""Closed-form MLP approximants: the activation moments, the least-squares property on truly
Gaussian inputs, the model's MLP parts, exactness for an affine MLP, and the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import make_tiny
from transformers import GPTJConfig, GPTJForCausalLM

from rome_edit.cli.main import main
from rome_edit.linearisation.io import mlp_parts
from rome_edit.linearisation.polynomial import (
    direction_cosines,
    empirical_linear_fit,
    fit_mixture_linear,
    fit_mlp_polynomial,
    gaussian_moments,
    r_squared,
    random_abs_cosine,
    top_singular_directions,
)
from rome_edit.linearisation.run import linearize_mlp
from rome_edit.models.architectures import get_module
from rome_edit.models.loading import wrap_model

M = torch.tensor([-2.0, -0.3, 0.0, 0.5, 1.7], dtype=torch.float64)
S = torch.tensor([0.3, 1.0, 2.0, 0.7, 1.5], dtype=torch.float64)
TEXTS = ["Name: Brittany. Gender: Female. Age: 31.", "Record for David: male, 40 years old.",
         "Margaret lives in the city of Boston.", "Robert said that he was tired today.",
         "The weather in Detroit was cold.", "Anna is a painter in Atlanta.",
         "Name: Peter. Gender: Male. City: Paris.", "Laura said that she liked the music."]


def test_erf_gelu_closed_form_equals_quadrature_of_torch_gelu():
    closed = gaussian_moments(M, S, "gelu_erf")
    quad = gaussian_moments(M, S, torch.nn.functional.gelu)
    for name in ("mean", "slope", "curvature"):
        torch.testing.assert_close(getattr(closed, name), getattr(quad, name), rtol=0,
                                   atol=1e-12)


def test_relu_closed_form_against_monte_carlo():
    closed = gaussian_moments(M, S, "relu")
    z = M + S * torch.randn(1_000_000, 1, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    # Statistical: each sample mean is within 5 standard errors (std/√n, n = 10⁶) of its
    # expectation (any seed: P(one of 10 misses) ≈ 6e-6).  The floor is for M/S = -6.7, where no
    # sample is positive (std 0) and the true values are 6e-13 and 1e-11.
    for closed_value, samples in ((closed.mean, torch.relu(z)), (closed.slope, (z > 0).double())):
        bound = 5 * samples.std(0) / len(z) ** 0.5 + 1e-10
        assert ((closed_value - samples.mean(0)).abs() <= bound).all(), (closed_value, bound)
    # E σ'' = density of z at 0
    density = torch.exp(-0.5 * (M / S) ** 2) / (S * (2 * torch.pi) ** 0.5)
    torch.testing.assert_close(closed.curvature, density)


def test_tanh_gelu_is_close_to_but_not_the_erf_form():
    tanh = gaussian_moments(M, S, lambda z: torch.nn.functional.gelu(z, approximate="tanh"))
    erf = gaussian_moments(M, S, "gelu_erf")
    gap = (tanh.slope - erf.slope).abs().max()
    assert 0 < gap < 2e-3


def _random_mlp(d_in=4, d_mlp=12, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(d_mlp, d_in, generator=g, dtype=torch.float64)
    b_in = torch.randn(d_mlp, generator=g, dtype=torch.float64) * 0.5
    w_out = torch.randn(d_out, d_mlp, generator=g, dtype=torch.float64)
    b_out = torch.randn(d_out, generator=g, dtype=torch.float64)
    mu = torch.randn(d_in, generator=g, dtype=torch.float64) * 0.3
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.5
    cov = a @ a.T + 0.3 * torch.eye(d_in, dtype=torch.float64)
    return w_in, b_in, w_out, b_out, mu, cov


def _assert_within_sampling_error(population_map, x, y, sigmas=5.0):
    """Statistical bound: the OLS slopes of ``y`` on ``x`` lie within ``sigmas`` standard errors
    of the population least-squares map, each standard error the heteroscedasticity-robust
    (sandwich) one, √(Σ⁻¹ E[x xᵀ e²] Σ⁻¹ / n)ⱼⱼ, since the residual of a nonlinear y depends on x.
    At 5σ a fresh seed fails with probability ≈ 12 · 6e-7 for the 12 slopes here."""
    a, c = empirical_linear_fit(x, y)
    xc, e = x - x.mean(0), y - (x @ a.T + c)
    sigma_inv = torch.linalg.inv(xc.T @ xc / len(x))
    se = torch.stack([(sigma_inv @ ((xc * e[:, [o]]).T @ (xc * e[:, [o]]) / len(x)) @ sigma_inv
                       / len(x)).diagonal().sqrt() for o in range(y.shape[1])])
    z = (population_map - a).abs() / se
    assert z.max() < sigmas, (z, se)


def _quadratic_features(x):
    pairs = list(itertools.combinations_with_replacement(range(x.shape[1]), 2))
    return torch.cat([x, torch.stack([x[:, i] * x[:, j] for i, j in pairs], 1)], 1)


@pytest.mark.parametrize("activation", ["gelu_erf", "relu"])
def test_closed_form_is_the_least_squares_fit_on_gaussian_inputs(activation):
    w_in, b_in, w_out, b_out, mu, cov = _random_mlp()
    poly = fit_mlp_polynomial(w_in, b_in, w_out, b_out, mu, cov, activation)
    g = torch.Generator().manual_seed(1)
    x = mu + torch.randn(400_000, len(mu), generator=g, dtype=torch.float64) @ \
        torch.linalg.cholesky(cov).T
    act = torch.nn.functional.gelu if activation == "gelu_erf" else torch.relu
    y = act(x @ w_in.T + b_in) @ w_out.T + b_out
    # Linear: the population least-squares map equals OLS on many Gaussian samples.
    _assert_within_sampling_error(poly.value_map, x, y)
    # Quadratic: its residual is as small as the best sample quadratic's (up to sampling).
    feats = _quadratic_features(x - mu)
    aq, cq = empirical_linear_fit(feats, y)
    r2_ols_quad = r_squared(y, feats @ aq.T + cq)
    r2_quad = r_squared(y, poly.value_quadratic(x))
    r2_lin = r_squared(y, poly.value_linear(x))
    assert r2_lin < r2_quad <= r2_ols_quad + 1e-9
    # Statistical: in-sample OLS beats the population fit by ≈ (p+1)/n·(1 - R²) ≤ (p+1)/n in
    # expectation (p = 14 features, n = 4·10⁵); 10× that (was a flat 2e-3, 50× looser).
    assert r2_quad == pytest.approx(r2_ols_quad, abs=10 * (feats.shape[1] + 1) / len(x))


def test_mixture_linear_is_the_least_squares_fit_on_mixture_inputs():
    w_in, b_in, w_out, b_out, mu, cov = _random_mlp(seed=3)
    one = fit_mixture_linear(w_in, b_in, w_out, b_out, torch.ones(1), mu[None], cov[None],
                             "gelu_erf")
    gauss = fit_mlp_polynomial(w_in, b_in, w_out, b_out, mu, cov, "gelu_erf")
    torch.testing.assert_close(one.value_map, gauss.value_map)
    # Two well separated components: the mixture map is the OLS fit of many mixture samples,
    # and a single Gaussian fitted to the same samples gives another (worse) map.
    g = torch.Generator().manual_seed(2)
    means = torch.stack([mu + 1.5, mu - 1.0])
    covs = torch.stack([cov, 0.5 * cov])
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    n = 400_000
    which = torch.rand(n, generator=g, dtype=torch.float64) < weights[0]
    eps = torch.randn(n, len(mu), generator=g, dtype=torch.float64)
    x = torch.where(which[:, None], means[0] + eps @ torch.linalg.cholesky(covs[0]).T,
                    means[1] + eps @ torch.linalg.cholesky(covs[1]).T)
    y = torch.nn.functional.gelu(x @ w_in.T + b_in) @ w_out.T + b_out
    mix = fit_mixture_linear(w_in, b_in, w_out, b_out, weights, means, covs, "gelu_erf")
    _assert_within_sampling_error(mix.value_map, x, y)
    single = fit_mlp_polynomial(w_in, b_in, w_out, b_out, x.mean(0), torch.cov(x.T), "gelu_erf")
    assert r_squared(y, mix.value_linear(x)) > r_squared(y, single.value_linear(x))


def test_mlp_parts_rebuild_the_modules_output(tokenizer):
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    for family in ("gptj", "gpt2", "gpt_neox"):
        lm = make_tiny(family, tokenizer)
        parts = mlp_parts(lm, 1)
        with torch.no_grad():
            rebuilt = parts.activation(x @ parts.w_in.T + parts.b_in) @ parts.w_out.T + \
                parts.b_out
            own = get_module(lm.model, lm.arch.mlp.format(1))(x[None])[0]
        torch.testing.assert_close(rebuilt, own, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gated"):
        mlp_parts(make_tiny("llama", tokenizer), 1)


def test_an_affine_mlp_is_approximated_exactly(tokenizer):
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=1024, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        rotary_dim=4, n_inner=64, activation_function="linear")
    lm = wrap_model(GPTJForCausalLM(config), tokenizer, "tiny-linear-gptj")
    result = linearize_mlp(lm, 1, TEXTS, heldout_fraction=0.25)
    for name in ("key_linear", "key_quadratic", "value_linear", "value_quadratic"):
        assert result.r2[name] == pytest.approx(1.0, abs=1e-5), name


def test_linearize_on_a_gelu_model_scores_held_out_tokens(tiny_gptj):
    result = linearize_mlp(tiny_gptj, 1, TEXTS, heldout_fraction=0.25)
    assert result.n_heldout_tokens > 0 and result.n_fit_tokens > result.n_heldout_tokens
    assert "quadrature" in result.moments_method  # gelu_new: the model's own tanh-GELU
    for value in result.r2.values():
        assert value <= 1.0
    erf = linearize_mlp(tiny_gptj, 1, TEXTS, heldout_fraction=0.25, moments="gelu_erf")
    assert erf.moments_method.startswith("closed form")
    with pytest.raises(ValueError, match="moments"):
        linearize_mlp(tiny_gptj, 1, TEXTS, moments="cubic")
    mixed = linearize_mlp(tiny_gptj, 1, TEXTS, heldout_fraction=0.25, components=2)
    assert mixed.r2["value_linear_mixture"] <= 1.0 and mixed.mixture is not None


def test_singular_directions_and_cosines():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    matrix = u @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.2, 0.1],
                                         dtype=torch.float64)) @ u.T
    s, left, right = top_singular_directions(matrix, 2)
    torch.testing.assert_close(s, torch.tensor([5.0, 3.0], dtype=torch.float64))
    cos = direction_cosines(left, {"first": -u[:, 0], "second": u[:, 1]})
    assert cos["first"][0] == pytest.approx(1.0) and cos["second"][1] == pytest.approx(1.0)
    assert cos["first"][1] == pytest.approx(0.0, abs=1e-12)
    assert random_abs_cosine(256) == pytest.approx((2 / (torch.pi * 256)) ** 0.5, rel=1e-2)


def test_cli_linearize(tiny_gptj, tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "lin"
    assert main(["linearize", "--model", str(path), "--layer", "1", "--corpus", str(corpus),
                 "--out", str(out)]) == 0
    report = json.loads((out / "linearize.json").read_text())
    assert set(report["r2"]) >= {"key_linear", "key_quadratic", "value_linear",
                                 "value_quadratic"}
    assert len(report["svd"]["value"]["singular_values"]) == 5
    code = main(["linearize", "--model", str(path), "--layer", "9", "--corpus", str(corpus),
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
