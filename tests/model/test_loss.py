"""The ELBO terms against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model.loss import elbo_terms, gaussian_kl, reconstruction_nll

LN2 = math.log(2.0)


def _tiny_case() -> dict[str, torch.Tensor]:
    """One image of 2 pixels and 2 latents.

    Pixels x = (1, 0), logits (0, ln 3): sigmoid = (1/2, 3/4), Bernoulli NLL = ln 2 + ln 4 = 3 ln 2.
    q = N((1, 0), diag(1, 2)): KL = 0.5 (1 + 1 - 1 - 0) + 0.5 (0 + 2 - 1 - ln 2) = 0.5 + 0.5 (1 - ln 2).
    """
    return {
        "logits": torch.tensor([[[[0.0, math.log(3.0)]]]], dtype=torch.float64),
        "images": torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64),
        "mean": torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        "log_var": torch.tensor([[0.0, LN2]], dtype=torch.float64),
    }


def test_bernoulli_nll_by_hand() -> None:
    case = _tiny_case()
    nll = reconstruction_nll(case["logits"], case["images"])
    assert nll.shape == (1,)
    assert nll.item() == pytest.approx(3 * LN2, abs=1e-12)


def test_bernoulli_nll_accepts_continuous_targets_and_sums_per_image() -> None:
    # Target 1/2 at logit 0: -(0.5 ln 0.5 + 0.5 ln 0.5) = ln 2 per pixel.
    logits = torch.zeros(2, 1, 1, 2, dtype=torch.float64)
    images = torch.tensor([[[[0.5, 0.5]]], [[[0.5, 1.0]]]], dtype=torch.float64)
    assert reconstruction_nll(logits, images).tolist() == pytest.approx([2 * LN2, 2 * LN2], abs=1e-12)


def test_gaussian_nll_by_hand() -> None:
    case = _tiny_case()
    # Mean (1/2, 3/4), std 1/2: residuals/std (1, -3/2) -> 0.5 + 1.125, plus 2 (ln 0.5 + 0.5 ln 2 pi).
    expected = 1.625 + 2 * math.log(0.5) + math.log(2 * math.pi)
    nll = reconstruction_nll(case["logits"], case["images"], "gaussian", gaussian_std=0.5)
    assert nll.item() == pytest.approx(expected, abs=1e-12)


def test_kl_by_hand_and_per_dimension() -> None:
    case = _tiny_case()
    kl = gaussian_kl(case["mean"], case["log_var"])
    assert kl.shape == (1, 2)
    assert kl[0].tolist() == pytest.approx([0.5, 0.5 * (1 - LN2)], abs=1e-12)


def test_kl_is_exactly_zero_for_the_prior() -> None:
    kl = gaussian_kl(torch.zeros(3, 5), torch.zeros(3, 5))
    assert torch.equal(kl, torch.zeros(3, 5))


def test_elbo_terms_by_hand() -> None:
    terms = elbo_terms(**_tiny_case())
    kl = 1.0 - 0.5 * LN2
    assert terms.reconstruction.item() == pytest.approx(3 * LN2, abs=1e-12)
    assert terms.kl.item() == pytest.approx(kl, abs=1e-12)
    assert terms.negative_elbo.item() == pytest.approx(3 * LN2 + kl, abs=1e-12)
    assert terms.loss.item() == pytest.approx(3 * LN2 + kl, abs=1e-12)
    assert terms.kl_per_dim.tolist() == pytest.approx([0.5, 0.5 * (1 - LN2)], abs=1e-12)


def test_elbo_terms_are_batch_means() -> None:
    case = _tiny_case()
    # Second image: 2 pixels at 1/2 with logits 0 (NLL 2 ln 2), posterior equal to the prior (KL 0).
    batch = {
        "logits": torch.cat([case["logits"], torch.zeros_like(case["logits"])]),
        "images": torch.cat([case["images"], torch.full_like(case["images"], 0.5)]),
        "mean": torch.cat([case["mean"], torch.zeros_like(case["mean"])]),
        "log_var": torch.cat([case["log_var"], torch.zeros_like(case["log_var"])]),
    }
    terms = elbo_terms(**batch)
    assert terms.reconstruction.item() == pytest.approx(2.5 * LN2, abs=1e-12)
    assert terms.kl_per_dim.tolist() == pytest.approx([0.25, 0.25 * (1 - LN2)], abs=1e-12)
    assert terms.kl.item() == pytest.approx(0.5 - 0.25 * LN2, abs=1e-12)


def test_free_bits_and_beta_change_only_the_loss() -> None:
    # Per-dimension KL (0.5, 0.153...) is floored at 0.5 -> (0.5, 0.5), times beta 2 -> 2.0.
    plain = elbo_terms(**_tiny_case())
    terms = elbo_terms(**_tiny_case(), beta=2.0, free_bits=0.5)
    assert terms.loss.item() == pytest.approx(3 * LN2 + 2.0, abs=1e-12)
    for name in ("negative_elbo", "reconstruction", "kl", "kl_per_dim"):
        assert torch.equal(getattr(terms, name), getattr(plain, name)), name


def test_free_bits_gradient_stops_below_the_floor() -> None:
    case = _tiny_case()
    log_var = case["log_var"].clone().requires_grad_(True)
    terms = elbo_terms(case["logits"], case["images"], case["mean"], log_var, free_bits=0.5)
    terms.loss.backward()
    assert log_var.grad is not None
    # Dimension 1 has KL 0.153 < 0.5: the floor holds it, no gradient; dimension 0 (KL exactly 0.5) is at it.
    assert log_var.grad[0, 1].item() == 0.0


def test_mismatched_shapes_and_unknown_likelihood_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_nll(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="likelihood"):
        reconstruction_nll(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "laplace")  # type: ignore[arg-type]
