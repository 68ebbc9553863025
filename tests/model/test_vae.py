"""The network's shapes, config validation and the log_var clamp."""

from __future__ import annotations

import json

import pytest
import torch

from model.vae import VAE, VaeConfig, VaeOutput, reparameterize


@pytest.mark.parametrize(
    ("image_shape", "widths"),
    [((1, 28, 28), (8, 16)), ((3, 32, 32), (8, 16, 16)), ((1, 16, 24), (4, 8)), ((3, 8, 12), (4,))],
)
def test_shapes(image_shape: tuple[int, int, int], widths: tuple[int, ...]) -> None:
    config = VaeConfig(image_shape=image_shape, latent_dim=5, widths=widths, hidden_dim=16)
    vae = VAE(config)
    images = torch.rand(3, *image_shape)
    output = vae(images)
    assert isinstance(output, VaeOutput)
    assert output.logits.shape == (3, *image_shape)
    assert output.mean.shape == output.log_var.shape == output.z.shape == (3, 5)
    assert vae.decode(torch.zeros(7, 5)).shape == (7, *image_shape)


def test_default_config_shapes() -> None:
    vae = VAE(VaeConfig())
    mean, log_var = vae.encode(torch.rand(2, 1, 28, 28))
    assert mean.shape == log_var.shape == (2, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_shape": (1, 30, 28)}, "multiples of 4"),
        ({"image_shape": (1, 28, 28), "widths": (8, 8, 8)}, "multiples of 8"),
        ({"image_shape": (1, 0, 28)}, "multiples of 4"),
        ({"image_shape": (2, 28, 28)}, "channels must be 1 or 3"),
        ({"image_shape": (28, 28)}, "channels, height, width"),
        ({"widths": ()}, "widths"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"log_var_min": 1.0, "log_var_max": 1.0}, "log_var_min"),
    ],
)
def test_invalid_configs_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VaeConfig(**kwargs)  # type: ignore[arg-type]


def test_wrong_image_shape_raises() -> None:
    vae = VAE(VaeConfig(image_shape=(1, 16, 16), widths=(4, 8), hidden_dim=8))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        vae.encode(torch.rand(2, 3, 16, 16))


def test_config_round_trips_through_json() -> None:
    config = VaeConfig(image_shape=(3, 32, 32), latent_dim=8, widths=(8, 16), hidden_dim=32, log_var_min=-6.0)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["image_shape"] == [3, 32, 32]
    assert VaeConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown VaeConfig keys \['depth'\]"):
        VaeConfig.from_dict({**data, "depth": 3})


def test_log_var_is_clamped_to_the_config_range() -> None:
    config = VaeConfig(image_shape=(1, 8, 8), latent_dim=3, widths=(4,), hidden_dim=8)
    vae = VAE(config)
    head = vae.encoder_head[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias[3:] = torch.tensor([1000.0, -1000.0, 0.5])
    _, log_var = vae.encode(torch.rand(2, 1, 8, 8))
    assert log_var[:, 0].tolist() == [8.0, 8.0]
    assert log_var[:, 1].tolist() == [-12.0, -12.0]
    # Well inside the range the clamp is the identity up to softplus tails (exp(-7.5) ~ 5.5e-4).
    assert log_var[:, 2].tolist() == pytest.approx([0.5, 0.5], abs=1e-3)


def test_same_seed_same_weights() -> None:
    config = VaeConfig(image_shape=(1, 16, 16), widths=(4, 8), hidden_dim=8)
    torch.manual_seed(3)
    first = VAE(config).state_dict()
    torch.manual_seed(3)
    second = VAE(config).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_reparameterize_uses_the_generator() -> None:
    mean = torch.tensor([[1.0, -2.0]])
    log_var = torch.tensor([[0.0, 2.0 * torch.log(torch.tensor(3.0)).item()]])
    eps = torch.randn((1, 2), generator=torch.Generator().manual_seed(7))
    z = reparameterize(mean, log_var, torch.Generator().manual_seed(7))
    # std = exp(0.5 * log_var) = (1, 3)
    torch.testing.assert_close(z, mean + torch.tensor([[1.0, 3.0]]) * eps)


def test_train_and_eval_mode_compute_the_same_function() -> None:
    vae = VAE(VaeConfig(image_shape=(1, 16, 16), widths=(4, 8), hidden_dim=8))
    images = torch.rand(4, 1, 16, 16)
    train_mean, _ = vae.train().encode(images)
    eval_mean, _ = vae.eval().encode(images)
    assert torch.equal(train_mean, eval_mean)
