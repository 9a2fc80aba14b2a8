"""One directory per model: weights, config and decision threshold, loadable for prediction and embedding.

A classifier artifact holds ``model.onnx`` (the exported network inference runs, with its SHA-256 in the config's
``"onnx"`` entry; written by training and by ``covidcxr export --model DIR``), ``model.safetensors`` (the weights,
for training and export) and ``config.json`` (architecture, input size, normalisation,
segmentation mode, threshold chosen on validation, class names, training-data summary, package version and the
weights' SHA-256), ``val_predictions.csv`` (so ensembles can re-choose a threshold) and, when the segmentation
mode is not ``none``, ``segmenter/`` with the lung-segmenter weights used in training (self-contained).
An ensemble artifact holds ``config.json`` (``"kind": "ensemble"``) and copies of its members in ``members/``.

Preprocessing is one function, :func:`covidcxr.transforms.preprocess.preprocess` with the settings this config
stores (:class:`~covidcxr.transforms.preprocess.PreprocessCfg`), shared by training validation and inference.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidcxr import __version__
from covidcxr.classification.inference import Artifact, EnsembleArtifact, ModelArtifact
from covidcxr.classification.mirror import MIRROR_FILE
from covidcxr.classification.ood import REFERENCE_FILE
from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import file_sha256, write_json
from covidcxr.vocab import LABELS

if TYPE_CHECKING:
    from covidcxr.models.classifier import CxrClassifier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
SEGMENTER_DIR = "segmenter"
MEMBERS_DIR = "members"
# Files that make up a classifier artifact (a training run directory holds more: checkpoints, logs, masks).
ARTIFACT_ENTRIES = (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, VAL_PREDICTIONS_FILE, SEGMENTER_DIR, REFERENCE_FILE, MIRROR_FILE)
_REQUIRED_KEYS = ("arch", "input_size", "normalization", "seg_mode", "threshold", "weights_sha256")






def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelError(f"{directory}: model directory not found")
    if not path.is_file():
        raise ModelError(f"{path}: config file missing; not a model artifact directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: corrupt config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path}: corrupt config (expected a JSON object)")
    return config


# ---------------------------------------------------------------------------------------------------------
# Preprocessing shared by training and inference
# ---------------------------------------------------------------------------------------------------------






def segmenter_files(weights: str | Path | None) -> list[Path]:
    """The files that make up a lung segmenter: its weights, the JSON config and (when exported) the ONNX next to them.

    Args:
        weights: Weights file (or folder) as given to ``LungSegmenter.load``; None = the shipped weights.

    Returns:
        Existing files, weights first.

    Raises:
        ModelError: The weights file does not exist.
    """
    from covidcxr.segmentation import weights as seg_weights

    path = Path(weights) if weights is not None else seg_weights.default_weights_path()
    if path.is_dir():
        path = path / seg_weights.WEIGHTS_NAME
    if not path.is_file():
        raise ModelError(f"{path}: segmenter weights not found (train them with `covidcxr segment train` or "
                         "pass --segmenter PATH)")
    config = path.with_suffix(".json")
    if not config.is_file():
        raise ModelError(f"{config}: segmenter config missing next to {path.name}")
    onnx = path.with_suffix(".onnx")
    return [path, config, onnx] if onnx.is_file() else [path, config]


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def save_artifact(
    directory: str | Path,
    model: CxrClassifier,
    config: Mapping[str, Any],
    *,
    segmenter_weights: str | Path | None = None,
    val_predictions: pd.DataFrame | None = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write a classifier artifact.

    Args:
        directory: Target folder (created; artifact files inside are replaced).
        model: The trained network.
        config: Settings (see module docstring); ``weights_file``, ``weights_sha256``, ``package_version``,
            ``num_features`` and ``format_version`` are filled in here.
        segmenter_weights: Lung-segmenter weights to copy into ``segmenter/`` when ``config["seg_mode"]`` is not
            ``none`` (None = the shipped weights).
        val_predictions: Validation predictions (``image, patient_id, y, prob``) saved for ensembles.
        weights_dtype: ``float32`` or ``float16`` (floating tensors stored in half precision; loading converts
            them back to float32).

    Returns:
        The artifact directory.

    Raises:
        ConfigError: Missing required settings.
    """
    import copy

    from safetensors.torch import save_file

    from covidcxr.models.export import export_classifier

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    missing = [k for k in ("arch", "input_size", "normalization", "seg_mode", "threshold") if k not in cfg]
    if missing:
        raise ConfigError(f"artifact config lacks {missing}")
    if weights_dtype not in ("float32", "float16"):
        raise ConfigError(f"weights_dtype={weights_dtype!r}: expected float32 or float16")
    half = weights_dtype == "float16"
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"arch": model.arch, "format": "covidcxr-classifier"})
    # The network inference runs, exported from the weights as stored (float16 storage: the values it rounds to).
    stored = copy.deepcopy(model).float().cpu().eval()
    stored.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    onnx_entry = export_classifier(stored, directory / ONNX_FILE, int(cfg["input_size"]))
    cfg.update(
        format_version=FORMAT_VERSION,
        kind="classifier",
        num_classes=model.num_classes,
        num_features=model.num_features,
        class_names=list(cfg.get("class_names", LABELS)),
        weights_file=WEIGHTS_FILE,
        weights_dtype=weights_dtype,
        weights_sha256=file_sha256(weights),
        package_version=__version__,
    )
    onnx_entry["weights_sha256"] = cfg["weights_sha256"]
    cfg["onnx"] = onnx_entry
    seg_dir = directory / SEGMENTER_DIR
    if cfg["seg_mode"] != "none":
        files = segmenter_files(segmenter_weights)
        if seg_dir.exists():
            shutil.rmtree(seg_dir)
        seg_dir.mkdir()
        for f in files:
            shutil.copy2(f, seg_dir / f.name)
        if len(files) < 3:  # a segmenter saved before ONNX export existed: export the copy
            from covidcxr.segmentation.weights import export_segmenter

            files.append(export_segmenter(seg_dir / files[0].name))
        cfg["segmenter"] = {
            "weights": f"{SEGMENTER_DIR}/{files[0].name}",
            "files": [f"{SEGMENTER_DIR}/{f.name}" for f in files],
            "sha256": file_sha256(files[0]),
        }
    else:
        cfg["segmenter"] = None
    if val_predictions is not None:
        val_predictions.to_csv(directory / VAL_PREDICTIONS_FILE, index=False)
    write_json(directory / CONFIG_FILE, cfg)
    log.info("saved model artifact %s (%s, sha256 %s)", directory, model.arch, cfg["weights_sha256"][:12])
    return directory




def _load_classifier(directory: Path, config: dict[str, Any], verify: bool) -> ModelArtifact:
    from covidcxr.runtime import EXPORT_HINT, OnnxNetwork

    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ModelError(f"{directory / CONFIG_FILE}: config lacks {missing}")
    entry = config.get("onnx")
    onnx = directory / (entry.get("file", ONNX_FILE) if isinstance(entry, dict) else ONNX_FILE)
    if not isinstance(entry, dict) or not onnx.is_file():
        raise ModelError(f"{onnx}: the model has no exported network (ONNX) for inference; run `covidcxr export "
                         f"--model {directory}` (needs `pip install 'covidcxr[train]'`) to write it")
    if entry.get("weights_sha256") not in (None, config["weights_sha256"]):
        raise ModelError(f"{onnx}: exported from other weights than {config.get('weights_file', WEIGHTS_FILE)} "
                         f"(SHA-256 differs); {EXPORT_HINT} again")
    if "num_features" not in config:
        raise ModelError(f"{directory / CONFIG_FILE}: config lacks 'num_features'")
    network = OnnxNetwork(onnx, sha256=entry.get("sha256") if verify else None)
    return ModelArtifact(directory, config, network)


def model_hash(directory: str | Path) -> str:
    """The weights hash an artifact folder declares (what indexes and embedding shards record), without loading it.

    Raises:
        ModelError: no readable config, or one without a hash.
    """
    config = _read_config(Path(directory))
    if not config.get("weights_sha256"):
        raise ModelError(f"{Path(directory) / CONFIG_FILE}: config has no weights_sha256")
    return str(config["weights_sha256"])


SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / "covid_classifier"


def shipped_model_dir() -> Path:
    """Folder of the COVID-19 classifier that ships with the package (see its ``MODEL_CARD.md``).

    Raises:
        ModelError: The package was installed without it.
    """
    if not (SHIPPED_MODEL_DIR / CONFIG_FILE).is_file():
        raise ModelError(f"{SHIPPED_MODEL_DIR}: the shipped classifier is missing from this installation; "
                         "reinstall covidcxr or pass --model DIR")
    return SHIPPED_MODEL_DIR


def resolve_model_dir(model: str | Path | None) -> tuple[Path, bool]:
    """The model folder to use: ``model`` when given, else the shipped classifier (logged, so users know).

    Returns:
        ``(folder, is_shipped)``.
    """
    if model is not None:
        return Path(model), False
    folder = shipped_model_dir()
    log.info("no --model given: using the shipped classifier %s (research use, not a diagnostic device)", folder)
    return folder, True


def load_artifact(directory: str | Path, device: Any = "auto", *, verify: bool = True) -> Artifact:
    """Load a classifier or ensemble artifact.

    Args:
        directory: The artifact folder (a training ``--out`` folder is one).
        device: Accepted for compatibility; the exported networks run on the CPU (ONNX Runtime, float32).
        verify: Check the exported network's SHA-256 against the config.

    Returns:
        A :class:`ModelArtifact` or :class:`EnsembleArtifact`.

    Raises:
        ModelError: Missing or corrupt files (the message names the file).
    """
    directory = Path(directory)
    config = _read_config(directory)
    if device not in (None, "auto", "cpu") and str(device) != "cpu":
        log.warning("device %r: inference runs on the CPU (ONNX Runtime, float32)", str(device))
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelError(f"{directory / CONFIG_FILE}: format_version {config['format_version']} is newer than "
                         f"this package supports ({FORMAT_VERSION}); upgrade covidcxr")
    if config.get("kind", "classifier") == "ensemble":
        members_cfg = config.get("members")
        if not members_cfg:
            raise ModelError(f"{directory / CONFIG_FILE}: ensemble config lists no members")
        members = []
        for entry in members_cfg:
            art = load_artifact(directory / entry["dir"], "cpu", verify=verify)
            if not isinstance(art, ModelArtifact):
                raise ModelError(f"{directory / entry['dir']}: nested ensembles are not supported")
            members.append(art)
        weights = np.asarray([float(e.get("weight", 1.0)) for e in members_cfg])
        return EnsembleArtifact(directory, config, members, weights / weights.sum())
    return _load_classifier(directory, config, verify)


# ---------------------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------------------


def copy_artifact(src: str | Path, dst: str | Path) -> Path:
    """Copy only the artifact files of a model directory (not checkpoints, logs or mask caches).

    Args:
        src: Classifier artifact (or training run) folder.
        dst: New folder (must not exist).

    Returns:
        ``dst``.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for name in ARTIFACT_ENTRIES:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dst / name)
        elif p.is_file():
            shutil.copy2(p, dst / name)
    return dst
