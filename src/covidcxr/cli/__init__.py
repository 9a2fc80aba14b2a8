"""Command-line entry point ``covidcxr``: parse, call the library, print, exit code. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from covidcxr import __version__
from covidcxr.errors import CxrError

log = logging.getLogger("covidcxr")

# Each module defines ``register(subparsers)`` adding its sub-commands with ``set_defaults(func=...)``; the
# modules import their heavy dependencies inside the command functions so ``covidcxr --help`` stays fast.
_COMMAND_MODULES = (
    "covidcxr.cli.data_cmd",
    "covidcxr.cli.segment_cmd",
    "covidcxr.cli.classify_cmd",
    "covidcxr.cli.index_cmd",
    "covidcxr.cli.serve_cmd",
    "covidcxr.cli.demo_cmd",
)


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
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        Process exit code: 0 on success, 2 on a user-facing error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
