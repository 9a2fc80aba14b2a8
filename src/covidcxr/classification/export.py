"""``covidcxr export``: write the ONNX networks inference runs into existing model artifacts (needs torch).

Training writes them itself (:func:`covidcxr.classification.artifact.save_artifact`,
:func:`covidcxr.segmentation.weights.save_unet`); this module does it for artifacts made before, or whose weights
were replaced: the classifier (``model.onnx``), a segmenter copied into the artifact (``segmenter/lung_unet.onnx``)
and, for an ensemble, every member. The weights themselves are not touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from covidcxr.classification.artifact import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, _read_config
from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import file_sha256, write_json

log = logging.getLogger(__name__)


def load_torch_classifier(directory: str | Path, *, verify: bool = True) -> Any:
    """The classifier of an artifact as a torch :class:`~covidcxr.models.classifier.CxrClassifier` (float32, eval).

    Args:
        directory: A classifier artifact folder.
        verify: Check the weights' SHA-256 against the config.

    Raises:
        ModelError: Missing or corrupt files, or weights that do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from covidcxr.models.classifier import create_classifier

    directory = Path(directory)
    config = _read_config(directory)
    if config.get("kind", "classifier") != "classifier":
        raise ModelError(f"{directory / CONFIG_FILE}: an ensemble has no single network; load its members")
    weights = directory / config.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    if verify and file_sha256(weights) != config.get("weights_sha256"):
        raise ModelError(f"{weights}: weights file is corrupt or was replaced (SHA-256 differs from config.json)")
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: corrupt weights ({exc})") from exc
    norm = config["normalization"]
    try:
        model = create_classifier(config["arch"], "none", num_classes=int(config.get("num_classes", 2)),
                                  mean=norm["mean"], std=norm["std"], init=False)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(f"{weights}: weights do not fit {config['arch']!r} ({exc})") from exc
    except ConfigError as exc:
        raise ModelError(f"{directory / CONFIG_FILE}: {exc}") from exc
    return model.float().eval()


def export_model(directory: str | Path) -> list[Path]:
    """Write (or rewrite) the ONNX networks of a classifier or ensemble artifact and record them in its config.

    Args:
        directory: The artifact folder.

    Returns:
        The ONNX files written.

    Raises:
        ModelError: Missing or corrupt files.
    """
    from covidcxr.models.export import export_classifier

    directory = Path(directory)
    config = _read_config(directory)
    if config.get("kind", "classifier") == "ensemble":
        written: list[Path] = []
        for entry in config.get("members") or []:
            written += export_model(directory / entry["dir"])
        if not written:
            raise ModelError(f"{directory / CONFIG_FILE}: ensemble config lists no members")
        return written
    model = load_torch_classifier(directory)
    path = directory / ONNX_FILE
    entry = export_classifier(model, path, int(config["input_size"]))
    entry["weights_sha256"] = config["weights_sha256"]
    written = [path]
    seg = config.get("segmenter")
    if seg and not seg.get("builtin"):
        from covidcxr.segmentation.weights import export_segmenter

        onnx = export_segmenter(directory / seg["weights"])
        rel = f"{Path(seg['weights']).parent.as_posix()}/{onnx.name}"
        seg["files"] = sorted({*seg.get("files", []), rel})
        written.append(onnx)
    elif seg and seg.get("builtin"):
        from covidcxr.segmentation.weights import default_weights_path

        if not default_weights_path().with_suffix(".onnx").is_file():
            raise ModelError(f"{default_weights_path().with_suffix('.onnx')}: the package's lung segmenter has no "
                             "exported network; run `covidcxr export --segmenter` first")
    config["onnx"] = entry
    config.setdefault("num_features", int(model.num_features))
    write_json(directory / CONFIG_FILE, config)
    log.info("exported %s -> %s (%.1f MB)", directory, path, path.stat().st_size / 1e6)
    return written
