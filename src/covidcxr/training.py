"""Lightning runs shared by segmentation and classification training: clean output and a graceful stop.

:func:`lightning_output` makes each Lightning log line appear once (through the application's handlers), drops
Lightning's advertisements and silences a few known, unactionable warnings by message and module.
:class:`GracefulStop` turns SIGINT/SIGTERM into a resumable ``last.ckpt`` and :class:`~covidcxr.errors.Interrupted`
(exit 130/143 in the CLI).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import lightning as L

from covidcxr.errors import Interrupted

_run_log = logging.getLogger(__name__)


_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


_LIGHTNING_EMITTERS = ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero")


_LIGHTNING_DEPRECATIONS = (
    # Lightning's pytree helper builds torch's deprecated LeafSpec (torch >= 2.9); Lightning's to fix.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


RESUME_WARNINGS = (
    (r"Checkpoint directory .* exists and is not empty", r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    # A checkpoint written on SIGINT/SIGTERM ends mid-epoch; the rest of that epoch draws fresh shuffled batches.
    (r"You're resuming from a checkpoint that ended before the epoch ended", r"lightning\.pytorch\.loops\."),
)


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing [litlogger] / [litmodels] ...").

    Lightning has no switch for them (Lightning-AI/pytorch-lightning#21294): the litlogger tip shows unless a
    ``LitLogger`` is used, the litmodels tip whenever Lightning adds its default checkpoint callback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")


@contextmanager
def lightning_output(known_warnings: Sequence[tuple[str, str]] = ()) -> Iterator[None]:
    """Around building a Trainer and ``fit``: each Lightning log line once, without adverts or known noise.

    Lightning attaches a stderr handler to ``lightning`` always, and to ``lightning.pytorch`` / ``lightning.fabric``
    (turning propagation off) when the root logger had no handler at import time. Once the application has
    configured logging (the CLI does, before Lightning is imported), every Lightning record therefore went
    through Lightning's handler *and* the root one. While the root logger has handlers, Lightning's own handlers
    are detached, its records propagate to the application's handlers and follow the application's level
    (``covidcxr -v`` shows them); everything is restored on exit. Without root handlers Lightning's handlers stay,
    the only output. The targeted warning filters also end on exit.

    Args:
        known_warnings: Extra ``(message regex, module regex)`` warnings to silence, e.g. :data:`RESUME_WARNINGS`.
    """
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            if name not in logging.Logger.manager.loggerDict:
                continue
            logger = logging.getLogger(name)
            own = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # Lightning's bare ones
            saved.append((logger, own, logger.propagate, logger.level))
            for handler in own:
                logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    tips = _DropLightningTips()
    for name in _LIGHTNING_EMITTERS:
        logging.getLogger(name).addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message, category, module in _LIGHTNING_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            for message, module in known_warnings:
                warnings.filterwarnings("ignore", message=message, module=module)
            yield
    finally:
        for name in _LIGHTNING_EMITTERS:
            logging.getLogger(name).removeFilter(tips)
        for logger, own, propagate, level in saved:
            for handler in own:
                logger.addHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)


class _StopRequested(Exception):
    """Raised at a step boundary after SIGINT/SIGTERM; Lightning turns it into ``on_exception`` + teardown."""


class GracefulStop(L.Callback):
    """SIGINT (Ctrl+C) or SIGTERM during ``fit``: finish the current step, save a resumable checkpoint, stop.

    Left to itself Lightning loses the work and the exit status: on SIGTERM it stops after the batch without a
    checkpoint and its ``SIGTERMException`` (a ``SystemExit`` without a code) exits 0; on Ctrl+C it exits 1.
    Use ``with stop:`` around ``fit`` (installs the handlers in the main thread, restores the previous ones on
    exit) and pass ``stop`` in the Trainer's callbacks. The first signal only sets a flag; the next training batch
    raises before it starts (so the checkpoint's progress counters match the optimizer steps taken; a running
    validation finishes first), all DDP ranks at the same step; ``on_exception`` writes the full state to
    ``checkpoint`` (what ``--resume`` loads) and :meth:`raise_if_stopped` after ``fit`` raises
    :class:`~covidcxr.errors.Interrupted` (exit 128 + signal in the CLI). A second signal stops at once, unsaved.

    Args:
        checkpoint: Where the interrupted run's state goes (``checkpoints/last.ckpt``).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: str | os.PathLike[str]) -> None:
        self.checkpoint = Path(checkpoint)
        self.signum: int | None = None
        self.saved: Path | None = None
        self._forced = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored on purpose (nohup, background job)
                    self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            self._forced = True
            raise KeyboardInterrupt
        self.signum = signum  # acted on at the next batch (no logging inside a signal handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ``fit`` has just put Lightning's SIGTERM handler in front of ours (it would raise SIGTERMException at the
        # next batch end, mid-validation included); take SIGTERM back. Lightning's teardown restores ours.
        if signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, self._on_signal)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done and trainer.is_global_zero:  # Lightning's own warning about this is silenced (RESUME_WARNINGS)
            _run_log.info("resuming inside epoch %d after %d batches: the rest of it is a fresh shuffle",
                          trainer.current_epoch + 1, done)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        requested = self.signum is not None
        if trainer.world_size > 1:  # every rank stops before the same step, whichever got the signal
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        if self.signum is None:
            self.signum = int(signal.SIGTERM)
        name = signal.Signals(self.signum).name
        if trainer.is_global_zero:
            _run_log.warning("%s received: stopped at step %d; saving %s", name, trainer.global_step, self.checkpoint)
        raise _StopRequested(name)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.signum is None or self._forced:
            return
        try:
            trainer.save_checkpoint(self.checkpoint, weights_only=False)  # full state: --resume loads it
        except (OSError, RuntimeError, ValueError, AttributeError) as exc:  # full disk, not set up yet: keep the stop
            _run_log.warning("could not save %s on stopping: %s", self.checkpoint, exc)
            return
        self.saved = self.checkpoint

    def raise_if_stopped(self) -> None:
        """Raise :class:`~covidcxr.errors.Interrupted` when a signal stopped (or arrived during) ``fit``."""
        if self.signum is not None:
            raise Interrupted(self.signum, self.saved or (self.checkpoint if self.checkpoint.is_file() else None))
