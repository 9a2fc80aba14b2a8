"""The lung-segmentation U-Net (MONAI) and its config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from covidcxr.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Lung U-Net
# ---------------------------------------------------------------------------------------------------------

# (section: lung U-Net factory)

# The config travels with the weights (lung_unet.json) and derives the preprocessing, timm-style: the model
# architecture keys feed build_unet, the rest (input size, normalisation, threshold) drive LungSegmenter.
# Default: MONAI's residual UNet with a stride-2 first stage; it is ~4x cheaper on CPU than a BasicUNet with a
# full-resolution stage at the same width, which is what makes >= 15 images/s on 2 cores reachable.
UNET_ARCHS = ("unet", "basic_unet")
UNET_NORMALISATIONS = ("zscore", "unit")
DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "arch": "unet",
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
    "dropout": 0.0,
    "in_channels": 1,
    "out_channels": 1,
    "classes": ["lung"],
    "input_size": 256,
    "normalisation": "zscore",
    "threshold": 0.5,
}


def unet_config(config: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Complete and check a lung U-Net config.

    Args:
        config: Partial config; missing keys take :data:`DEFAULT_UNET_CONFIG` values. Unknown keys are kept
            (e.g. training metadata stored in ``lung_unet.json``).
        **overrides: Keys that replace those of ``config``.

    Returns:
        A new, complete config dict.

    Raises:
        ConfigError: An architecture value is invalid (the message names the key and the valid values).
    """
    cfg = {**DEFAULT_UNET_CONFIG, **dict(config or {}), **overrides}
    if cfg["arch"] not in UNET_ARCHS:
        raise ConfigError(f"U-Net arch={cfg['arch']!r}: expected one of {', '.join(UNET_ARCHS)}")
    if cfg["normalisation"] not in UNET_NORMALISATIONS:
        raise ConfigError(f"normalisation={cfg['normalisation']!r}: expected one of {', '.join(UNET_NORMALISATIONS)}")
    channels = [int(c) for c in cfg["channels"]]
    if cfg["arch"] == "unet":
        strides = [int(s) for s in cfg["strides"]]
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ConfigError(f"channels={channels}, strides={strides}: need >= 2 channels and one stride fewer")
        factor = 1
        for s in strides:
            factor *= s
    else:
        if len(channels) != 6:
            raise ConfigError(f"channels={channels}: basic_unet needs 6 feature sizes (5 levels + output stage)")
        factor = 16
    if any(c <= 0 for c in channels):
        raise ConfigError(f"channels={channels}: every channel count must be positive")
    size = int(cfg["input_size"])
    if size <= 0 or size % factor:
        raise ConfigError(f"input_size={cfg['input_size']!r}: must be a positive multiple of {factor} for this U-Net")
    if not 0.0 < float(cfg["threshold"]) < 1.0:
        raise ConfigError(f"threshold={cfg['threshold']!r}: must be in (0, 1)")
    if int(cfg["out_channels"]) != len(cfg["classes"]):
        raise ConfigError(f"out_channels={cfg['out_channels']} but classes={cfg['classes']}: lengths must match")
    cfg["channels"], cfg["input_size"], cfg["threshold"] = channels, size, float(cfg["threshold"])
    return cfg


def build_unet(config: Mapping[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the lung-segmentation U-Net (MONAI) from a config.

    Args:
        config: Config as in :data:`DEFAULT_UNET_CONFIG` (missing keys take the defaults).
        **overrides: Keys that replace those of ``config`` (e.g. ``channels=[4, 8, 16]`` for a tiny test net).

    Returns:
        An untrained 2-D network mapping ``(N, in_channels, S, S)`` to logits ``(N, out_channels, S, S)``.

    Raises:
        ConfigError: Invalid config (see :func:`unet_config`).
    """
    from monai.networks.nets import BasicUNet, UNet

    cfg = unet_config(config, **overrides)
    if cfg["arch"] == "unet":
        return UNet(
            spatial_dims=2,
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg["out_channels"]),
            channels=tuple(cfg["channels"]),
            strides=tuple(int(s) for s in cfg["strides"]),
            num_res_units=int(cfg["num_res_units"]),
            norm=cfg["norm"],
            dropout=float(cfg["dropout"]),
        )
    return BasicUNet(
        spatial_dims=2,
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        features=tuple(cfg["channels"]),
        norm=cfg["norm"],
        dropout=float(cfg["dropout"]),
    )
