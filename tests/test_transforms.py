"""Joint image + mask transforms and model-derived preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from covidcxr.errors import ConfigError
from covidcxr.transforms.joint import (
    RandomGamma,
    build_seg_eval_transform,
    build_seg_train_transform,
    normalise,
    prepare_batch,
)
from covidcxr.transforms.resize import resize_image, resize_mask


def _square_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.full((1, size, size), 0.1)
    mask = torch.zeros((1, size, size), dtype=torch.uint8)
    image[0, 20:40, 24:44] = 0.9
    mask[0, 20:40, 24:44] = 1
    return image, mask


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def test_joint_augmentation_keeps_image_and_mask_aligned() -> None:
    torch.manual_seed(0)
    image, mask = _square_pair()
    transform = build_seg_train_transform(48, degrees=15, translate=0.1, scale=(0.8, 1.2), elastic=0.5)
    moved = 0
    for _ in range(20):
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.dtype == torch.uint8
        assert out_image.shape == out_mask.shape == (1, 48, 48)
        assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest interpolation keeps the mask binary
        bright = out_image > 0.5 * out_image.max()
        assert _iou(bright, out_mask) > 0.75
        reference = torch.from_numpy(resize_mask(mask[0].numpy(), 48))
        moved += _iou(out_mask[0], reference) < 0.95
    assert moved >= 10  # the geometry really changed, so alignment was tested under motion


def test_separate_draws_would_misalign() -> None:
    """Negative control: transforming image and mask in two calls (two random draws) breaks the alignment."""
    torch.manual_seed(1)
    image, mask = _square_pair()
    transform = build_seg_train_transform(48, degrees=15, translate=0.15, scale=(0.8, 1.2))
    ious = []
    for _ in range(20):
        out_image = transform(tv_tensors.Image(image))
        out_mask = transform(tv_tensors.Mask(mask))
        ious.append(_iou(out_image > 0.5 * out_image.max(), out_mask))
    assert min(ious) < 0.6


def test_photometric_steps_change_image_only() -> None:
    torch.manual_seed(2)
    image, mask = _square_pair()
    transform = build_seg_train_transform(64, degrees=0, translate=0.0, scale=(1.0, 1.0), brightness=0.5,
                                          contrast=0.5, gamma=(0.5, 2.0))
    changed = 0
    for _ in range(5):
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert torch.equal(out_mask, mask)
        assert 0.0 <= float(out_image.min()) and float(out_image.max()) <= 1.0
        changed += not torch.allclose(out_image, image, atol=1e-3)
    assert changed >= 4


def test_random_gamma_passes_masks_through() -> None:
    image, mask = _square_pair()
    out_image, out_mask = RandomGamma((2.0, 2.0))(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert torch.equal(out_mask, mask)
    assert torch.allclose(out_image, image**2.0, atol=1e-6)


def test_eval_transform_resizes_pair() -> None:
    image, mask = _square_pair()
    out_image, out_mask = build_seg_eval_transform(32)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert out_image.shape == out_mask.shape == (1, 32, 32)
    assert float(out_mask.float().mean()) == pytest.approx(float(mask.float().mean()), abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"translate": 0.6}, "translate"),
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"elastic": 2.0}, "elastic"),
    ],
)
def test_train_transform_rejects_bad_ranges(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_seg_train_transform(32, **kwargs)


def test_resize_mask_is_binary_and_area_preserving() -> None:
    mask = np.zeros((100, 80), np.uint8)
    mask[10:70, 20:60] = 1
    small = resize_mask(mask, (50, 40))
    assert isinstance(small, np.ndarray) and small.dtype == np.uint8 and set(np.unique(small).tolist()) <= {0, 1}
    assert float(small.mean()) == pytest.approx(mask.mean(), abs=0.01)


def test_resize_image_rejects_non_2d() -> None:
    with pytest.raises(ConfigError, match="2-D"):
        resize_image(np.zeros((4, 4, 3), np.float32), 8)


def test_normalise_modes() -> None:
    x = torch.rand(3, 1, 16, 16) * 0.5 + 0.2
    z = normalise(x, "zscore")
    assert torch.allclose(z.flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.flatten(1).std(1), torch.ones(3), atol=1e-3)
    assert torch.equal(normalise(x, "unit"), x)
    with pytest.raises(ConfigError, match="normalisation"):
        normalise(x, "imagenet")


def test_prepare_batch_follows_config() -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((40, 60), dtype=np.float32), rng.random((64, 64), dtype=np.float32)]
    batch = prepare_batch(images, {"input_size": 32, "normalisation": "zscore"})
    assert batch.shape == (2, 1, 32, 32) and batch.dtype == torch.float32
    assert abs(float(batch[0].mean())) < 1e-4
    assert prepare_batch([], {"input_size": 32, "normalisation": "unit"}).shape == (0, 1, 32, 32)


def test_segmenter_input_is_numpy_and_what_training_normalises() -> None:
    # Inference feeds segmenter_input (numpy, no torch) to the exported U-Net, whose graph normalises; training
    # normalises prepare_batch's tensor with the same torch code: the two inputs are the same array.
    from covidcxr.transforms.preprocess import segmenter_input

    rng = np.random.default_rng(1)
    images = [rng.random((40, 60), dtype=np.float32), rng.random((70, 50), dtype=np.float32)]
    x = segmenter_input(images, {"input_size": 32})
    assert isinstance(x, np.ndarray) and x.shape == (2, 1, 32, 32) and x.dtype == np.float32
    batch = prepare_batch(images, {"input_size": 32, "normalisation": "unit"})
    np.testing.assert_array_equal(batch.numpy(), x)
