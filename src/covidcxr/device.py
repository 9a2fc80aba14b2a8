"""Hardware choices made once: device, numeric precision and DataLoader workers (training; torch imported lazily).

Inference does not come here for precision: it runs in float32 on ONNX Runtime (:mod:`covidcxr.runtime`), so the
answer does not depend on the CPU. What follows is about training.

bf16 is used only where the hardware computes it natively: CUDA devices with bf16 support, and CPUs on which
oneDNN reports native bf16 (AVX512-BF16 or AMX). Elsewhere, for example on AVX2-only CPUs, bf16 autocast is
emulated and was measured ~20x slower than float32 for a ResNet18 training step, so ``auto`` means float32 there.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from covidcxr.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LIGHTNING_PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32-true", "32")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: An unknown device string.
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from exc


def cpu_capability() -> str:
    """The SIMD level PyTorch dispatches to on this CPU (``AVX2``, ``AVX512``, ...), or ``unknown``."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # older builds lack the probe; the answer is informational only
        return "unknown"


def cpu_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX512-BF16 / AMX); False when it cannot tell."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe, missing on some builds: then no bf16
        return False


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 arithmetic on ``device`` is native (fast), not emulated.

    Args:
        device: ``cpu``, ``cuda[:N]`` or a :class:`torch.device`.

    Returns:
        True for CUDA devices with bf16 support and CPUs with native oneDNN bf16.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def uses_cuda(accelerator: str) -> bool:
    """Whether a Lightning ``accelerator`` setting ends up on a CUDA GPU on this machine."""
    import torch

    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Map ``"auto"`` to a Lightning precision for training on this machine.

    Args:
        precision: ``auto`` or a Lightning precision string.
        accelerator: Lightning accelerator setting.

    Returns:
        ``bf16-mixed`` where bf16 is native; ``16-mixed`` on CUDA without bf16; ``32-true`` otherwise.

    Raises:
        ConfigError: Unknown precision.
    """
    import torch

    if precision not in LIGHTNING_PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(LIGHTNING_PRECISIONS)}")
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if cpu_native_bf16():
        return "bf16-mixed"
    log.info("CPU without native bf16 (capability %s): training in float32", cpu_capability())
    return "32-true"


def inference_bf16(device: str | torch.device, precision: str = "auto") -> bool:
    """Whether inference (classification, segmentation, Grad-CAM) on ``device`` runs under bf16 autocast.

    Args:
        device: Inference device.
        precision: ``auto`` (bf16 where native), ``fp32`` or ``bf16`` (forced, even where emulated).

    Returns:
        True when bf16 autocast is to be used.

    Raises:
        ConfigError: Unknown precision.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "auto":
        return native_bf16(device)
    return precision == "bf16"


def prefer_channels_last(device: str | torch.device) -> bool:
    """Whether channels-last tensors are the faster layout for convolutions on ``device``.

    Measured with ``benchmarks/precision.py`` (ResNet18 and EfficientNet-Lite0, 224 px): faster for training and
    inference on an AVX-512 CPU and on the same CPU restricted to AVX2, in float32 and bf16; cuDNN prefers it
    under mixed precision. Kept as a function so a device where it does not pay can say so in one place.
    """
    import torch

    return torch.device(device).type in ("cpu", "cuda")


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers and ``taskset`` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_num_workers(cap: int = 8) -> int:
    """DataLoader worker processes that fit this machine: one per CPU beyond the main process, at most ``cap``.

    On a 2-CPU machine that is one worker: the main process trains, the worker decodes and augments.
    """
    return max(0, min(cap, available_cpus() - 1))
