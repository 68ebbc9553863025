"""model/scores.py on hand-computed tiny cases, against PyTorch's loss, and the reference's percentiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.loss import gaussian_kl, reconstruction_nll
from model.scores import (
    ScoreReference,
    anomaly_p_values,
    atypicality,
    bernoulli_nll_from_logits,
    bernoulli_nll_from_probabilities,
    calibrated_reference,
    combine_scores,
    gaussian_nll,
    kl_to_standard_normal,
    score_images,
    tail_probabilities,
)


def test_kl_of_the_prior_itself_is_zero_and_matches_the_closed_form() -> None:
    assert kl_to_standard_normal(np.zeros((2, 5)), np.zeros((2, 5))).tolist() == [0.0, 0.0]
    # KL(N(1, e^-2) || N(0, 1)) = 0.5 * (1 + e^-2 - 1 + 2) per dimension.
    expected = 0.5 * (1 + math.exp(-2) - 1 + 2) * 3
    assert kl_to_standard_normal(np.ones((1, 3)), np.full((1, 3), -2.0))[0] == pytest.approx(expected)


def test_bernoulli_nll_by_hand_and_stable_where_sigmoid_saturates() -> None:
    logits = np.array([[[[0.0, 2.0]]]])
    images = np.array([[[[1.0, 0.0]]]])
    # -log(sigmoid(0)) - log(1 - sigmoid(2)) = log 2 + log(1 + e^2)
    assert bernoulli_nll_from_logits(logits, images)[0] == pytest.approx(
        math.log(2) + math.log1p(math.exp(2))
    )
    # At logit 40 a float32 probability is exactly 1: only the logits give the true 40 nats.
    assert bernoulli_nll_from_logits(np.full((1, 1, 1, 1), 40.0), np.zeros((1, 1, 1, 1)))[0] == pytest.approx(
        40
    )
    clipped = bernoulli_nll_from_probabilities(np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1)))
    assert clipped[0] == pytest.approx(-math.log(1e-6))


def test_gaussian_nll_by_hand() -> None:
    value = gaussian_nll(np.full((1, 1, 1, 2), 0.5), np.array([[[[0.5, 0.7]]]]), std=0.1)[0]
    expected = 0.5 * (0.2 / 0.1) ** 2 + 2 * (math.log(0.1) + 0.5 * math.log(2 * math.pi))
    assert value == pytest.approx(expected)


def log_normal(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.square(x - mean) / var + np.log(2 * math.pi * var)).sum(axis=-1)


def test_iwae_at_one_sample_is_the_one_sample_elbo() -> None:
    rng = np.random.default_rng(0)
    mean, log_var = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) - 1
    eps, nll = rng.normal(size=(1, 4, 3)), rng.uniform(50, 60, (1, 4))
    z = mean + np.exp(0.5 * log_var) * eps[0]
    by_hand = nll[0] + log_normal(z, mean, np.exp(log_var)) - log_normal(z, 0.0, np.ones(3))
    np.testing.assert_allclose(combine_scores(mean, log_var, eps, nll, np.zeros(4))["iwae"], by_hand)


def test_iwae_tightens_the_elbo_as_k_grows() -> None:
    """A linear-Gaussian toy whose -log p(x) is known: iwae falls towards it from the ELBO's side."""
    rng = np.random.default_rng(1)
    # p(z) = N(0, 1), p(x|z) = N(x; z, 1) in one dimension, x = 1: -log p(x) = -log N(1; 0, 2).
    true_nll = -log_normal(np.array([1.0]), 0.0, np.array([2.0]))
    mean, log_var = np.array([[0.2]]), np.array([[0.3]])  # a deliberately poor q(z|x)
    bounds = []
    for k in (1, 8, 512):
        eps = rng.normal(size=(k, 200, 1))
        z = mean[None] + np.exp(0.5 * log_var)[None] * eps
        nll = -log_normal(np.ones((k, 200, 1)), z, np.ones(1))
        scores = combine_scores(np.repeat(mean, 200, 0), np.repeat(log_var, 200, 0), eps, nll, np.zeros(200))
        bounds.append(scores["iwae"].mean())
        if k == 1:
            elbo = scores["negative_elbo"].mean()
    assert bounds[0] == pytest.approx(elbo, abs=0.1)  # k=1: the same bound in expectation
    assert bounds[0] > bounds[1] > bounds[2] > true_nll - 0.01
    assert bounds[2] == pytest.approx(true_nll, abs=0.02)


def test_iwae_is_stable_for_thousands_of_nats() -> None:
    mean = log_var = np.zeros((1, 2))
    eps = np.zeros((3, 1, 2))
    scores = combine_scores(mean, log_var, eps, np.full((3, 1), 5000.0), np.zeros(1))
    assert np.isfinite(scores["iwae"]).all()
    # All weights equal: log-mean-exp is the weight itself; log p(z) = log q(z) at eps = 0, mean 0, var 1.
    assert scores["iwae"][0] == pytest.approx(5000.0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_scores_agree_with_pytorch_on_the_same_draws(likelihood: str) -> None:
    torch.manual_seed(0)
    images = torch.rand((3, 1, 4, 4))
    mean, log_var = torch.randn((3, 2)), torch.randn((3, 2)) - 1
    eps = torch.randn((5, 3, 2), dtype=torch.float64)
    z = (mean.double() + torch.exp(0.5 * log_var.double()) * eps).float()
    weights = torch.randn((2, 16))
    logits = (z.reshape(15, 2) @ weights).reshape(15, 1, 4, 4) * 3  # any decoder will do
    mean_logits = (mean @ weights).reshape(3, 1, 4, 4) * 3
    targets = images.expand(5, *images.shape).reshape(15, 1, 4, 4)
    nll = reconstruction_nll(logits, targets, likelihood, 0.1).double().reshape(5, 3)  # type: ignore[arg-type]
    expected_elbo = nll.mean(dim=0) + gaussian_kl(mean, log_var).sum(dim=1).double()
    scores = score_images(
        images.numpy(),
        mean.numpy(),
        log_var.numpy(),
        eps.numpy(),
        logits.numpy(),
        torch.sigmoid(mean_logits).numpy(),
        likelihood=likelihood,  # type: ignore[arg-type]
        draw_logits_given=True,
        observation_std=0.1,
    )
    np.testing.assert_allclose(scores["negative_elbo"], expected_elbo.numpy(), atol=1e-3)
    expected_mse = (torch.sigmoid(mean_logits) - images).square().flatten(1).mean(dim=1)
    np.testing.assert_allclose(scores["reconstruction_mse"], expected_mse.numpy(), rtol=1e-5)


def test_percentile_and_the_conformal_two_sided_tail_at_the_edges() -> None:
    reference = ScoreReference.from_scores({"negative_elbo": np.arange(1.0, 101.0)}, samples=4)
    percentiles = reference.percentile("negative_elbo", np.array([0.0, 1.0, 50.5, 100.0, 1000.0]))
    np.testing.assert_allclose(percentiles, [0.0, 0.0, 50.0, 100.0, 100.0])
    # (1 + #{at least as extreme}) / 101, doubled for two sides: never 0, 1/101 beyond the range.
    values = np.array([0.0, 5.5, 50.5, 95.5, 1000.0])
    tails = tail_probabilities(reference, {"negative_elbo": values})
    np.testing.assert_allclose(tails[0], [2 / 101, 2 * 6 / 101, 1.0, 2 * 6 / 101, 2 / 101])
    np.testing.assert_allclose(
        reference.upper_tail("negative_elbo", np.array([100.0, 100.5])), [2 / 101, 1 / 101]
    )


def test_upper_tailed_tests_and_fishers_statistic() -> None:
    ramp = np.arange(1.0, 101.0)
    reference = ScoreReference.from_scores(
        {"negative_elbo": ramp, "reconstruction_mse": ramp, "latent_nll": ramp}, samples=4
    )
    scores = {
        "negative_elbo": np.array([50.5, 50.5]),
        "reconstruction_mse": np.array([0.0, 90.5]),
        "latent_nll": np.array([0.0, 99.5]),
    }
    tails = tail_probabilities(reference, scores)
    # A very small error or a very likely code is not atypical (one-sided); large ones are.
    np.testing.assert_allclose(tails, [[1.0, 1.0], [1.0, 11 / 101], [1.0, 2 / 101]])
    np.testing.assert_allclose(atypicality(reference, scores), [0.0, -2 * np.log(11 / 101 * 2 / 101)])


def test_p_values_are_calibrated_on_held_out_data(tmp_path: Path) -> None:
    """Conformal p-values: on fresh data exchangeable with the reference, P(p < alpha) <= alpha."""
    rng = np.random.default_rng(0)
    names = ("negative_elbo", "reconstruction_mse", "latent_nll")
    # Correlated scores, as real ones are: the combined statistic is not chi-squared.
    shared = rng.normal(size=500)
    reference = calibrated_reference({n: shared + 0.5 * rng.normal(size=500) for n in names}, samples=16)
    fresh_shared = rng.normal(size=20_000)
    fresh = {n: fresh_shared + 0.5 * rng.normal(size=20_000) for n in names}
    p_values = anomaly_p_values(reference, atypicality(reference, fresh))
    for alpha in (0.01, 0.05, 0.2):
        assert (p_values < alpha).mean() == pytest.approx(alpha, abs=0.015)
    reference.save(tmp_path / "reference.npz")
    loaded = ScoreReference.load(tmp_path / "reference.npz")
    assert loaded.names == reference.names and loaded.samples == 16 and loaded.size == 500
    np.testing.assert_array_equal(loaded.values, reference.values)


def test_a_reference_without_the_anomaly_score_is_refused(tmp_path: Path) -> None:
    ScoreReference.from_scores({"kl": np.arange(5.0)}, samples=1).save(tmp_path / "reference.npz")
    with pytest.raises(ValueError, match="no negative_elbo scores"):
        ScoreReference.load(tmp_path / "reference.npz")
