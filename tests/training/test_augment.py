"""Augmentation: integer translations move pixels exactly; the affine warp keeps shapes and range."""

from __future__ import annotations

import torch

from training.augment import Augmentation, random_affine, random_translate


def test_translate_moves_a_single_pixel_by_at_most_the_shift() -> None:
    images = torch.zeros((200, 1, 9, 9))
    images[:, 0, 4, 4] = 1.0
    moved = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert moved.sum(dim=(1, 2, 3)).tolist() == [1.0] * 200  # pixels are copied, never blended
    rows, columns = moved[:, 0].nonzero()[:, 1], moved[:, 0].nonzero()[:, 2]
    assert set((rows - 4).tolist()) == {-2, -1, 0, 1, 2}
    assert set((columns - 4).tolist()) == {-2, -1, 0, 1, 2}


def test_translate_fills_with_zeros_and_keeps_channels_together() -> None:
    images = torch.ones((50, 3, 5, 5))
    moved = random_translate(images, 1, torch.Generator().manual_seed(1))
    assert torch.equal(moved[:, 0], moved[:, 1]) and torch.equal(moved[:, 0], moved[:, 2])
    # Shifted by (dy, dx), a 5x5 block of ones keeps (5 - |dy|) * (5 - |dx|) ones.
    assert set(moved[:, 0].sum(dim=(1, 2)).tolist()) <= {25.0, 20.0, 16.0}


def test_affine_identity_when_ranges_are_zero_and_generator_reproducible() -> None:
    images = torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    same = random_affine(images, 0.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images)
    augment = Augmentation(translate_pixels=2, rotate_degrees=10.0, scale_range=0.1)
    first = augment(images, torch.Generator().manual_seed(5))
    second = augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not Augmentation().enabled
    assert not Augmentation(translate_pixels=2, probability=0.0).enabled


def test_probability_leaves_the_other_images_untouched() -> None:
    images = torch.zeros((400, 1, 5, 5))
    images[:, 0, 2, 2] = 1.0
    augment = Augmentation(translate_pixels=2, probability=0.25)
    moved = augment(images, torch.Generator().manual_seed(0))
    unchanged = (moved == images).flatten(1).all(dim=1)
    # Replay the generator: shifts are drawn first, then the per-image choice.
    replay = torch.Generator().manual_seed(0)
    shifts = torch.randint(-2, 3, (2, 400), generator=replay)
    chosen = torch.rand(400, generator=replay) < 0.25
    expected = ~chosen | (shifts == 0).all(dim=0)
    assert torch.equal(unchanged, expected)
    assert 60 < int(chosen.sum()) < 140
