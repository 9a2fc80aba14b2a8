"""The one inference runtime: an exported network (ONNX) run by ONNX Runtime on the CPU, in float32.

Every network that inference, serving, PACS and search run (the classifier, the lung U-Net) goes through
:class:`OnnxNetwork`: load the exported graph, check its SHA-256 against the one the model's config records, run a
batch, return the outputs by name. Torch is not imported here or by anything that loads a model for inference;
``covidcxr export`` (and training) write the graphs.

Why ONNX Runtime, not OpenVINO (``benchmarks/runtime.py`` measures both side by side; ``results/runtime.md``): on
the 2-core AVX2 machine measured, OpenVINO float32 was 20-37 % faster per network in two runs (last: classifier
138 vs 112 img/s, U-Net 84 vs 67 img/s at batch 16), but ONNX Runtime's CPU provider has one numeric path on every
x86-64 CPU (float32 kernels only), whereas OpenVINO switches to bf16 by itself on CPUs with native bf16 unless every
load pins the precision, which is the CPU-dependent answer this runtime exists to remove; ONNX Runtime is a ~17 MB
wheel (OpenVINO ~60 MB); and with it ``predict`` of 200 images ran 4.3x faster than the torch path and serving met
its target. Reduced precision is not offered: ``precision`` accepts ``fp32`` only and says why for anything else.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

CLASSIFIER_OUTPUTS = ("logits", "embedding", "feature_map", "class_maps")
"""What an exported classifier returns: logits ``(N, C)``, the pooled embedding ``(N, D)`` (pre-logits), the last
feature map ``(N, D, h, w)`` (the one the global average pool reduces) and ``class_maps`` ``(N, C, h, w)``, the head's
linear layer applied at every position of that map (no bias): with GAP + linear as the head, Grad-CAM of class ``c``
is ``relu(class_maps[:, c])`` up to a positive factor, so heat maps need no autograd."""
UNET_OUTPUTS = ("logits",)
"""What an exported lung U-Net returns: lung logits ``(N, 1, S, S)``; its input normalisation is inside the graph."""
INPUT_NAME = "image"
OPSET = 18

PRECISIONS = ("fp32",)
"""Inference precisions this runtime computes in (float32 on every CPU: the same answer everywhere)."""
EXPORT_HINT = "run `covidcxr export --model DIR` (needs `pip install 'covidcxr[train]'`) to write it"


def check_precision(precision: str) -> str:
    """Validate an inference precision; ``auto`` means float32.

    Raises:
        ConfigError: Anything but ``fp32``/``auto``; bf16 is named explicitly (not available in this runtime).
    """
    if precision in ("auto", "fp32", "float32"):
        return "fp32"
    if precision in ("bf16", "bf16-mixed"):
        raise ConfigError(f"precision={precision!r}: inference runs in float32 on ONNX Runtime so that every CPU "
                          "gives the same answer; bf16 is not available for inference (training keeps --precision)")
    raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")


def inference_threads() -> int:
    """Threads inference computes on: the CPUs this process may use, or ``COVIDCXR_THREADS``.

    Raises:
        ConfigError: ``COVIDCXR_THREADS`` is not an integer.
    """
    from covidcxr.device import available_cpus

    env = os.environ.get("COVIDCXR_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"COVIDCXR_THREADS={env!r}: expected a positive integer") from None
    return available_cpus()


def _read_graph(path: Path, sha256: str | None) -> tuple[bytes, str]:
    """The ``.onnx`` file's bytes and SHA-256, checked against ``sha256`` when given.

    Raises:
        ModelError: The file is missing or its hash differs.
    """
    import hashlib

    if not path.is_file():
        raise ModelError(f"{path}: exported network (ONNX) missing; {EXPORT_HINT}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ModelError(f"{path}: exported network is corrupt or was replaced (SHA-256 {digest[:12]}... differs "
                         f"from the config's {str(sha256)[:12]}...); {EXPORT_HINT} again")
    return data, digest


def _new_session(data: bytes, threads: int, path: Path) -> Any:
    """An ONNX Runtime CPU session (float32) with ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ModelError("onnxruntime is not installed: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
    # No spin-waiting between calls: on a few shared cores the spinning workers starve decoding, post-processing
    # and the web server's own threads.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a damaged graph
        raise ModelError(f"{path}: ONNX Runtime cannot load the network ({type(exc).__name__}: {exc})") from exc


class OnnxNetwork:
    """One exported network in an ONNX Runtime session (float32, CPU).

    Args:
        path: The ``.onnx`` file.
        sha256: Expected SHA-256 of the file (from the model's config); None skips the check.
        threads: Intra-op threads; None = :func:`inference_threads`.

    Raises:
        ModelError: The file is missing, its hash differs, or ONNX Runtime cannot load it.
    """

    def __init__(self, path: str | os.PathLike[str], *, sha256: str | None = None, threads: int | None = None) -> None:
        path = Path(path)
        data, digest = _read_graph(path, sha256)
        self.threads = int(threads or inference_threads())
        self.session = _new_session(data, self.threads, path)
        self.path = path
        self.sha256 = digest
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._single: Any = None  # the single-threaded session that split runs use, made on first use
        self._lock = threading.Lock()

    @property
    def input_shape(self) -> list[Any]:
        """The declared input shape (``['batch', 1, S, S]``)."""
        return list(self.session.get_inputs()[0].shape)

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None, *,
            batch_size: int = 32, split: int = 1) -> dict[str, np.ndarray]:
        """Run a batch (in chunks of ``batch_size``) and return the outputs by name.

        With ``split`` > 1 the batch is cut into that many parts, run at once from as many threads on one
        single-threaded session, instead of every operator being spread over :attr:`threads` threads: for a batch of
        many images that wastes less (no threads waiting for each other after every operator; on 2 cores 200 CXRs
        through the U-Net and the classifier took 4.1-4.3 s instead of 4.4-4.6 s, ``benchmarks/results/runtime*.md``).
        Each image's outputs are the same either way (ONNX Runtime computes every image alone, with the same
        kernels), which the tests check bit for bit.

        Args:
            x: float32 ``(N, C, H, W)``.
            outputs: Output names wanted (None = all).
            batch_size: Rows per session call.
            split: Parts run at once on the single-threaded session (1 = the session with :attr:`threads`
                threads); at most ``N // 2`` parts are made, so each part has two images or more.

        Returns:
            ``{name: float32 array with N rows}``.

        Raises:
            ConfigError: An unknown output name, an input that is not 4-D, or a batch size or split below 1.
            ModelError: (``split``) the ``.onnx`` file was replaced or removed since it was loaded.
        """
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise ConfigError(f"{self.path.name} has outputs {self.output_names}, not {unknown}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ConfigError(f"network input of shape {x.shape}: expected (N, C, H, W)")
        for key, value in (("batch_size", batch_size), ("split", split)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"{key}={value!r}: must be a positive integer")
        if len(x) == 0:
            return {n: np.zeros((0,), np.float32) for n in names}
        parts = min(int(split), len(x) // 2)
        if parts <= 1:
            return self._run_batches(self.session, x, names, batch_size)
        session = self._single_session()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parts, thread_name_prefix="covidcxr-onnx") as pool:
            got = list(pool.map(lambda part: self._run_batches(session, part, names, batch_size),
                                np.array_split(x, parts)))
        return {n: np.concatenate([g[n] for g in got]) for n in names}

    def _single_session(self) -> Any:
        if self.threads == 1:
            return self.session
        with self._lock:
            if self._single is None:
                # Read again rather than kept in memory from loading (most processes never split); the same bytes.
                self._single = _new_session(_read_graph(self.path, self.sha256)[0], 1, self.path)
            return self._single

    def _run_batches(self, session: Any, x: np.ndarray, names: list[str], batch_size: int) -> dict[str, np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(x), batch_size):
            got = session.run(names, {self.input_name: x[start : start + batch_size]})
            for acc, arr in zip(parts, got, strict=True):
                acc.append(arr)
        return {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in zip(names, parts, strict=True)}


_KERNEL_LOCK = threading.Lock()
_kernel_users = 0
_kernel_saved: tuple[int, Any] | None = None  # OpenCV's threads and the BLAS limiter from before the first block


@contextmanager
def kernel_threads(n: int = 1) -> Iterator[None]:
    """OpenCV and the BLAS libraries (numpy's, SciPy's and OpenCV's own OpenBLAS) on ``n`` thread(s) while any such
    block runs; the settings from before the first block come back when the last one ends (blocks in several threads
    may overlap: the first one's ``n`` holds until then). Process-wide: other threads' OpenCV/BLAS calls meanwhile
    run on ``n`` threads too, which changes their speed, not their results.

    Why: the manifest loop parallelises over images and pipeline stages with its own threads, and ONNX Runtime over
    each network's operators. OpenCV's and OpenBLAS's pools would add threads of their own to every small call
    (per-image resizes, distance transforms, connected components, the input-type check's 600 x 128 matrix
    product) that busy-wait after it and take the cores from the networks. Probabilities, masks, QC flags and
    labels do not change (tested); BLAS sums in another order on one thread, so the input gate's distances can
    differ in the last bit.

    Args:
        n: Threads for OpenCV and BLAS (>= 1).

    Raises:
        ConfigError: ``n`` below 1.
    """
    global _kernel_users, _kernel_saved
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"kernel threads n={n!r}: expected a positive integer")
    import cv2
    from threadpoolctl import threadpool_limits

    with _KERNEL_LOCK:
        if _kernel_users == 0:
            before = cv2.getNumThreads()
            cv2.setNumThreads(int(n))
            _kernel_saved = (before, threadpool_limits(limits=int(n), user_api="blas"))
        _kernel_users += 1
    try:
        yield
    finally:
        with _KERNEL_LOCK:
            _kernel_users -= 1
            if _kernel_users == 0 and _kernel_saved is not None:
                before, limiter = _kernel_saved
                limiter.restore_original_limits()
                cv2.setNumThreads(before)
                _kernel_saved = None


def onnx_runtime_version() -> str:
    """The ONNX Runtime version (for benchmark and provenance records)."""
    import onnxruntime as ort

    return str(ort.__version__)
