"""Saving, loading, exporting and installing lung U-Net weights (the shipped ones live in covidcxr/weights/).

A segmenter is three files side by side: ``lung_unet.safetensors`` (the weights, for training), ``lung_unet.json``
(its config) and ``lung_unet.onnx`` (the exported network that inference runs; its SHA-256 is in the config under
``"onnx"``). Only saving, loading into torch and exporting need torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidcxr.errors import ConfigError, ModelError, PretrainedWeightsError
from covidcxr.io.files import file_sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
WEIGHTS_NAME = "lung_unet.safetensors"
CONFIG_NAME = "lung_unet.json"
ONNX_NAME = "lung_unet.onnx"
MAX_WEIGHTS_BYTES = 15 * 1024 * 1024


# --------------------------------------------------------------------------------------------- weights
def _resolve_weights(path: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    if path is None:
        weights = WEIGHTS_DIR / WEIGHTS_NAME
        if not weights.is_file():
            raise PretrainedWeightsError(
                f"{weights}: shipped lung U-Net weights not found (not trained yet?); train them with "
                "`covidcxr segment train --manifest M --out DIR --install` or pass --weights"
            )
    else:
        weights = Path(path)
        if weights.is_dir():
            weights = weights / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelError(f"{weights}: lung U-Net weights file not found")
    config = weights.with_suffix(".json")
    if not config.is_file():
        raise ModelError(f"{config}: config file missing next to the weights {weights.name}")
    return weights, config


def default_weights_path() -> Path:
    """Path of the shipped weights file (it may not exist before the first training run is installed)."""
    return WEIGHTS_DIR / WEIGHTS_NAME


def shipped_weights_available() -> bool:
    """True when the package ships trained lung U-Net weights (and their config)."""
    return (WEIGHTS_DIR / WEIGHTS_NAME).is_file() and (WEIGHTS_DIR / CONFIG_NAME).is_file()


def save_unet(
    model: torch.nn.Module,
    config: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    half: bool | None = None,
) -> Path:
    """Save U-Net weights as safetensors plus the config as JSON (``lung_unet.safetensors`` / ``.json``).

    Args:
        model: The network built by :func:`covidcxr.models.build_unet`.
        config: Its config (architecture, input size, normalisation, threshold, training metadata).
        out_dir: Folder to write into (created).
        half: Store float tensors as fp16; None = only when fp32 would exceed the 15 MB budget.

    Returns:
        Path of the safetensors file.

    Raises:
        ModelError: The weights exceed the size budget even in fp16.
    """
    from safetensors.torch import save_file

    from covidcxr.models.unet import unet_config

    cfg = unet_config(config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    if half is None:
        half = nbytes > MAX_WEIGHTS_BYTES
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    cfg["weights_dtype"] = "float16" if half else "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "config": json.dumps(cfg, sort_keys=True)})
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ModelError(f"{weights}: {weights.stat().st_size / 2**20:.1f} MiB exceeds the 15 MB weights budget")
    cfg["weights_sha256"] = file_sha256(weights)
    # The network inference runs: exported from the weights as stored (fp16 storage -> the fp32 values used).
    state_model = load_unet_state(model, state)
    cfg["onnx"] = _export(state_model, cfg, out / ONNX_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return weights


def load_unet_state(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """A float32 CPU copy of ``model`` holding ``state`` (fp16 tensors widened), for export."""
    import copy

    clone = copy.deepcopy(model).float().cpu()
    clone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return clone.eval()


def _export(model: torch.nn.Module, config: dict[str, Any], path: Path) -> dict[str, Any]:
    from covidcxr.models.export import export_unet

    entry = export_unet(model, config, path)
    entry["weights_sha256"] = config["weights_sha256"]
    return entry


def export_segmenter(path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``lung_unet.onnx`` next to existing U-Net weights and record it in their ``lung_unet.json``.

    Args:
        path: Weights file or folder (None = the package's shipped weights).

    Returns:
        The ONNX file.

    Raises:
        ModelError: Missing or invalid files.
    """
    from covidcxr.io.files import write_json

    model, config, weights = load_unet(path)
    config.setdefault("weights_sha256", file_sha256(weights))
    config["onnx"] = _export(model, config, weights.with_suffix(".onnx"))
    write_json(weights.with_suffix(".json"), config)
    log.info("exported %s -> %s", weights, weights.with_suffix(".onnx"))
    return weights.with_suffix(".onnx")


def load_unet(path: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """Load U-Net weights and config (no network access).

    Args:
        path: A ``.safetensors`` file (config = same name with ``.json``), a folder holding
            ``lung_unet.safetensors``, or None for the shipped weights.

    Returns:
        ``(model in eval mode on CPU, config, weights path)``.

    Raises:
        PretrainedWeightsError: ``path`` is None and no shipped weights exist.
        ModelError: Files missing, corrupt or not matching the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from covidcxr.models.unet import build_unet, unet_config

    weights, config_path = _resolve_weights(path)
    try:
        config = unet_config(json.loads(config_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not a valid JSON config ({exc})") from exc
    except ConfigError as exc:
        raise ModelError(f"{config_path}: invalid U-Net config ({exc})") from exc
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights}: cannot read safetensors weights ({exc})") from exc
    model = build_unet(config)
    try:
        model.load_state_dict(state, strict=True)  # copies fp16 storage into the fp32 parameters
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not match the architecture in {config_path.name} ({exc})") from exc
    return model.eval(), config, weights


def install_weights(src_dir: str | os.PathLike[str], dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Copy ``lung_unet.safetensors`` and ``lung_unet.json`` into the package's weights folder.

    Args:
        src_dir: Folder holding the exported pair (a training ``--out`` folder).
        dest_dir: Target folder; None = the package's ``weights/``.

    Returns:
        The installed weights path.

    Raises:
        ModelError: The pair is missing or does not load.
    """
    weights, config = _resolve_weights(src_dir)
    load_unet(weights)  # refuse to install something that does not load
    if not weights.with_suffix(".onnx").is_file():
        export_segmenter(weights)
    dest = Path(dest_dir) if dest_dir is not None else WEIGHTS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, dest / WEIGHTS_NAME)
    shutil.copyfile(config, dest / CONFIG_NAME)
    shutil.copyfile(weights.with_suffix(".onnx"), dest / ONNX_NAME)
    log.info("installed lung U-Net weights into %s", dest)
    return dest / WEIGHTS_NAME
