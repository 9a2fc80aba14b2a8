"""``covidcxr demo``: the whole pipeline on the built-in synthetic cohort."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich only inside the command: ``covidcxr --help`` stays light
    from rich.console import Console


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo", help="run the whole pipeline on a synthetic cohort (synthetic data: shows the pipeline only)",
        description="Synthesise a cohort, validate and split it by patient, segment the lungs, train and evaluate "
                    "a classifier, build a similar-case index and search it. The cohort is synthetic: its numbers "
                    "show the pipeline working, not performance on real X-rays.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--patients", type=int, default=200, help="synthetic patients (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10, help="classifier epochs (default 10)")
    p.add_argument("--stages", nargs="+", default=["data", "segment", "train", "index", "real"],
                   choices=["data", "segment", "train", "index", "real"],
                   help="stages to run (data always runs; real: the shipped classifier on CC BY sample X-rays)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covidcxr.demo import DemoSettings, run_demo

    console = Console()
    repeats = _RepeatFilter(limit=3)
    for handler in logging.getLogger().handlers:
        handler.addFilter(repeats)
    console.print("[bold]covidcxr demo[/bold] - synthetic cohort: the numbers show the pipeline working, "
                  "not performance on real chest X-rays.")
    settings = DemoSettings(out_dir=args.out, n_patients=args.patients, seed=args.seed, epochs=args.epochs,
                            stages=tuple(args.stages))
    summary = run_demo(settings, lambda title, payload: _show(console, title, payload))
    for (name, template), count in repeats.suppressed.items():
        console.print(f"[dim]({count} more log messages like '{template}' from {name} not shown)[/dim]")
    console.print(f"\nDone in {summary['wall_time_s']} s; everything is under {summary['out_dir']}/ "
                  f"(summary: demo_summary.json).")
    return 0


class _RepeatFilter(logging.Filter):
    """Show the first few log records of each message template; count the rest.

    A cohort of hundreds of images repeats per-file notices (e.g. MONOCHROME1 inverted) that bury the
    stage summaries; the count is printed at the end so nothing is hidden silently.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: Counter[tuple[str, str]] = Counter()
        self.suppressed: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        # Per-file notices read "<path>: <reason>": group them by the reason.
        key = (record.name, record.getMessage().rsplit(": ", 1)[-1])
        self.seen[key] += 1
        if self.seen[key] > self.limit:
            self.suppressed[key] += 1
            return False
        return True


def _show(console: Console, title: str, payload: Any) -> None:
    from rich.table import Table

    console.rule(f"[bold]{title}")
    if hasattr(payload, "to_string"):  # a pandas table
        console.print(payload.to_string())
    elif isinstance(payload, dict) and "rows" in payload:
        q = payload.get("query", {})
        console.print(f"query: {q}")
        table = Table("rank", "similarity", "case", "patient", "label")
        for r in payload["rows"]:
            table.add_row(str(r.get("rank")), f"{float(r.get('similarity', r.get('score', 0))):.3f}", str(r.get("case_id")),
                          str(r.get("patient_id")), str(r.get("label")))
        console.print(table)
        if payload.get("retrieval"):
            console.print(f"retrieval on the test split: {payload['retrieval']}")
        console.print(f"contact sheet: {payload.get('sheet')}")
    elif isinstance(payload, dict):
        for key, value in payload.items():
            console.print(f"  {key}: {value}")
    else:
        console.print(str(payload))
