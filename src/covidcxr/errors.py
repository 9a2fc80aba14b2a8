"""One exception hierarchy for the whole package.

Every error raised on user input is a :class:`CxrError`, so callers (the CLI, the web app) can catch one type
and show its message, which always names the offending file or value and the reason.
"""

from __future__ import annotations

from pathlib import Path


class CxrError(Exception):
    """Base class of every error this package raises on bad input or state."""


class ImageError(CxrError):
    """An image file could not be used. The message starts with the file path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageReadError(ImageError):
    """The file is empty, truncated, corrupt or not an image at all."""


class UnsupportedImageError(ImageError):
    """The file is a valid image or DICOM object this package refuses (multi-frame, SR, CT/MR, codec missing)."""


class NotFrontalChestError(UnsupportedImageError):
    """A DICOM header says the image is not a frontal chest radiograph (lateral view, another body part)."""


class ImageTooLargeError(ImageError):
    """The image exceeds the pixel limit and was refused before decoding (decompression-bomb guard)."""


class ManifestError(CxrError):
    """A manifest has one or more problems; ``problems`` lists every one of them."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) in manifest:\n{listing}")


class SplitError(CxrError):
    """A patient-level split cannot be made as asked (too few patients, bad fractions)."""


class ConfigError(CxrError, ValueError):
    """An argument or configuration value is invalid; the message names the value and the valid choices."""


class ModelError(CxrError):
    """A model artifact or weights file is missing, corrupt or incompatible."""


class PretrainedWeightsError(ModelError):
    """Pretrained weights are unavailable (e.g. offline with no cached file); the message says what to do."""


class NotFittedError(CxrError, AttributeError):
    """An estimator-style object was used before ``fit``."""


class CaseIndexError(CxrError):
    """A similar-case index is missing, corrupt or incompatible with the embedding model."""


class IndexMismatchError(CaseIndexError):
    """An index was built with another embedding model, dimension or format version."""


class PacsError(CxrError):
    """A PACS (DICOMweb) request failed for good: refused credentials, unreachable server, a rejected store.

    The message names the request and the UID concerned, never credentials or patient identifiers.
    """


class Interrupted(CxrError):
    """A run was stopped by a signal (SIGINT / Ctrl+C or SIGTERM) after saving what it could.

    Attributes:
        signal: The signal number.
        exit_code: ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), the shell convention.
        checkpoint: The resumable checkpoint written before stopping, or None.
    """

    def __init__(self, signum: int, checkpoint: str | Path | None = None) -> None:
        import signal

        self.signal = int(signum)
        self.exit_code = 128 + self.signal
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        saved = f"; resumable checkpoint saved to {self.checkpoint}" if self.checkpoint else ""
        super().__init__(f"interrupted by {name}{saved}")
