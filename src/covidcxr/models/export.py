"""Exporting networks to ONNX for the inference runtime (:mod:`covidcxr.runtime`): the classifier and the lung U-Net.

Training-side code (needs torch). The exported graphs take a float32 batch ``(N, 1, S, S)`` in [0, 1] (dynamic batch)
and carry everything the network does to it (the classifier's grey-to-RGB stem and normalisation, the U-Net's
z-score), so inference only resizes. The classifier graph also returns its embedding, its last feature map and the
head applied to that map (``class_maps``), from which :mod:`covidcxr.classification.explain` computes CAM, which
equals Grad-CAM for a global-average-pool + linear head (checked here: ``cam_exact`` in the returned entry).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidcxr.errors import ModelError
from covidcxr.runtime import CLASSIFIER_OUTPUTS, INPUT_NAME, OPSET, UNET_OUTPUTS

log = logging.getLogger(__name__)


class _ClassifierGraph(nn.Module):
    """logits, embedding, last feature map and class maps of a :class:`~covidcxr.models.classifier.CxrClassifier`."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        store: list[torch.Tensor] = []
        hook = self.layer.register_forward_hook(lambda _m, _a, out: store.append(out))
        try:
            feats = self.model.forward_features(x)
        finally:
            hook.remove()
        fmap = store[-1]
        logits = self.model.forward_head(feats)
        class_maps = torch.einsum("nkhw,ck->nchw", fmap, self.model.head.weight)
        return logits, feats, fmap, class_maps


class _UnetGraph(nn.Module):
    """The U-Net with its input normalisation in front (the same torch code training runs)."""

    def __init__(self, model: nn.Module, normalisation: str) -> None:
        super().__init__()
        self.model, self.normalisation = model, normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from covidcxr.transforms.joint import normalise

        return self.model(normalise(x, self.normalisation))


def _to_onnx(module: nn.Module, example: torch.Tensor, outputs: tuple[str, ...]) -> bytes:
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings():
        # The tracer notes that shape checks in forward_features are constants in the graph: they are, by design.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.14 calls the TorchScript-based exporter "legacy"; it is the one that exports these nets in
        # seconds with exact parity (tests/test_runtime.py), so it is used on purpose.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(module, (example,), buf, input_names=[INPUT_NAME], output_names=list(outputs),
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def _write(data: bytes, path: Path) -> dict[str, Any]:
    import hashlib

    from covidcxr.io.files import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "opset": OPSET, "bytes": len(data)}


def export_classifier(model: nn.Module, path: str | Path, input_size: int, *, check: bool = True) -> dict[str, Any]:
    """Write a classifier as ONNX with the outputs of :data:`covidcxr.runtime.CLASSIFIER_OUTPUTS`.

    Args:
        model: A :class:`~covidcxr.models.classifier.CxrClassifier` (put in eval mode, moved to the CPU in float32).
        path: Target ``.onnx`` file (written atomically).
        input_size: Side of the network input (the artifact's ``input_size``).
        check: Compare the exported graph with the torch model in float32 on a random batch (ONNX Runtime).

    Returns:
        The config entry: ``file``, ``sha256``, ``opset``, ``bytes``, ``outputs``, ``cam_exact`` (the feature map's
        global average equals the embedding and the head is linear, so CAM equals Grad-CAM), ``max_abs_diff``.

    Raises:
        ModelError: The exported graph disagrees with the torch model.
    """
    from covidcxr.models.classifier import gradcam_target_layer

    model = model.float().cpu().eval().to(memory_format=torch.contiguous_format)
    graph = _ClassifierGraph(model, gradcam_target_layer(model)).eval()
    x = torch.rand(2, 1, int(input_size), int(input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        store: list[torch.Tensor] = []
        hook = graph.layer.register_forward_hook(lambda _m, _a, out: store.append(out))
        try:
            model.forward_features(x)
        finally:
            hook.remove()
        if store[-1].ndim != 4 or store[-1].shape[1] != model.head.in_features:
            raise ModelError(f"{getattr(model, 'arch', type(model).__name__)}: the heat-map layer's output has shape "
                             f"{tuple(store[-1].shape)}, not (N, {model.head.in_features}, h, w) as the head needs")
        logits, feats, fmap, _ = graph(x)
        # Grad-CAM == CAM needs: the embedding is the plain spatial mean of the hooked map, and the head adds
        # nothing but a linear layer (dropout is the identity in eval mode).
        gap_ok = fmap.ndim == 4 and bool(torch.allclose(fmap.mean((2, 3)), feats, atol=1e-5, rtol=1e-4))
        linear = feats @ model.head.weight.T + model.head.bias
        head_ok = bool(torch.allclose(model.forward_head(feats), linear, atol=1e-5))
    if not (gap_ok and head_ok):
        log.warning("%s: the head after the heat-map layer is not global average pooling + linear; heat maps are "
                    "class activation maps, not exactly Grad-CAM", getattr(model, "arch", type(model).__name__))
    entry = _write(_to_onnx(graph, x, CLASSIFIER_OUTPUTS), Path(path))
    entry.update(outputs=list(CLASSIFIER_OUTPUTS), cam_exact=gap_ok and head_ok)
    if check:
        got = _run_onnx(Path(path), x.numpy(), ["logits", "embedding"])
        diff = max(float(np.abs(got[0] - logits.numpy()).max()), float(np.abs(got[1] - feats.numpy()).max()))
        if not diff <= 1e-3:
            raise ModelError(f"{path}: exported classifier differs from the torch model by {diff:.2e}")
        entry["max_abs_diff"] = diff
    return entry


def export_unet(model: nn.Module, config: Mapping[str, Any], path: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Write a lung U-Net (with its input normalisation) as ONNX; output ``logits``.

    Args:
        model: The network from :func:`covidcxr.models.build_unet`.
        config: Its config (``input_size``, ``normalisation``).
        path: Target ``.onnx`` file.
        check: Compare with the torch model in float32 on a random batch.

    Returns:
        The config entry (``file``, ``sha256``, ``opset``, ``bytes``, ``outputs``, ``max_abs_diff``).

    Raises:
        ModelError: The exported graph disagrees with the torch model.
    """
    model = model.float().cpu().eval()
    graph = _UnetGraph(model, str(config["normalisation"])).eval()
    size = int(config["input_size"])
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    entry = _write(_to_onnx(graph, x, UNET_OUTPUTS), Path(path))
    entry["outputs"] = list(UNET_OUTPUTS)
    if check:
        with torch.no_grad():
            ref = graph(x).numpy()
        diff = float(np.abs(_run_onnx(Path(path), x.numpy(), ["logits"])[0] - ref).max())
        if not diff <= 1e-3:
            raise ModelError(f"{path}: exported U-Net differs from the torch model by {diff:.2e}")
        entry["max_abs_diff"] = diff
    return entry


def _run_onnx(path: Path, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    from covidcxr.runtime import OnnxNetwork

    out = OnnxNetwork(path).run(x, names)
    return [out[n] for n in names]
