"""``covidcxr pacs run | watch``: analyse a PACS's chest radiographs over DICOMweb and store results in their study."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli._model import DEVICE_HELP, MODEL_HELP, model_dir

_AUTH_EPILOG = """\
credentials (never on the command line, never logged):
  HTTP basic:    $COVIDCXR_PACS_USER and $COVIDCXR_PACS_PASSWORD, or --basic-auth-file with one line user:password
  bearer token:  $COVIDCXR_PACS_TOKEN, or --token-file
  TLS certificates are always verified (system store, or --ca-bundle).

what is written back into each study (new series, new UIDs, the study's identifiers copied):
  a Comprehensive SR (TID 1500) with P(covid), the label at the model's threshold, the model name/version/weights
  hash, the QC flags and the heat map's share inside the lungs (or "no result" and why), and a Secondary Capture of
  the heat map marked NOT FOR DIAGNOSTIC USE. A local ledger (--ledger) makes reruns add nothing.

exit status: 0 when nothing failed, 1 when an instance was refused (unreadable) or failed (PACS/network error),
2 on bad arguments or an unreachable PACS, 130/143 after SIGINT/SIGTERM (the instance in progress is finished).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--index", type=Path, default=None,
                   help="case index built with this model: adds the share of COVID-19 among similar cases")
    p.add_argument("-k", type=int, default=8, help="similar cases looked up with --index (default 8)")
    p.add_argument("--ledger", type=Path, default=None,
                   help="SQLite ledger of processed instances (default $XDG_STATE_HOME/covidcxr/pacs-ledger.sqlite)")
    p.add_argument("--token-file", type=Path, default=None, metavar="PATH", help="file holding a bearer token")
    p.add_argument("--basic-auth-file", type=Path, default=None, metavar="PATH",
                   help="file holding 'user:password' for HTTP basic authentication")
    p.add_argument("--ca-bundle", type=Path, default=None, metavar="PEM", help="trusted CA certificates (PEM)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries of a transient HTTP failure, with exponential back-off (default 3)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="also write every instance's outcome (UIDs, status, reason, probability) to this file")


def register(subparsers: Any) -> None:
    """Add the ``pacs`` command with its ``run`` and ``watch`` sub-commands.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    pacs = subparsers.add_parser("pacs", help="analyse chest radiographs in a PACS over DICOMweb, results stored "
                                              "back into each study")
    sub = pacs.add_subparsers(title="pacs commands", metavar="SUBCOMMAND")
    pacs.set_defaults(func=lambda args: (pacs.print_help(), 0)[1])

    p = sub.add_parser("run", help="process the studies once (given, since a date, or all)",
                       epilog=_AUTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--since", default=None, metavar="DATE", help="studies with StudyDate on or after DATE")
    which.add_argument("--study", nargs="+", default=None, metavar="UID", help="these Study Instance UIDs")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be processed; retrieve, store and record nothing")
    p.add_argument("--reprocess", action="store_true",
                   help="process instances the ledger holds as done again (new results with new UIDs)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("watch", help="poll for new studies and process them as they arrive, until interrupted",
                       epilog=_AUTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--since", default=None, metavar="DATE",
                   help="studies with StudyDate on or after DATE (default: the day the watch starts)")
    p.set_defaults(func=_cmd_watch)


def _open(args: argparse.Namespace, *, dry_run: bool = False, reprocess: bool = False) -> Any:
    from covidcxr.pacs.client import RetryPolicy, read_auth
    from covidcxr.pacs.ledger import default_ledger_path
    from covidcxr.pacs.runner import open_runner

    auth = read_auth(token_file=args.token_file, basic_auth_file=args.basic_auth_file)
    return open_runner(args.url, model_dir=model_dir(args.model), ledger_path=args.ledger or default_ledger_path(),
                       auth=auth, ca_bundle=args.ca_bundle, timeout=args.timeout,
                       retry=RetryPolicy(attempts=max(0, args.retries) + 1), device=args.device,
                       index_dir=args.index, k=args.k, dry_run=dry_run, reprocess=reprocess)


def _present(summary: Any, args: argparse.Namespace, title: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from covidcxr.errors import Interrupted
    from covidcxr.io.files import write_json
    from covidcxr.pacs.runner import summary_rows

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    console.print(f"{title}: {summary.studies} studies, {len(summary.outcomes)} instances, {summary.seconds:.1f} s")
    counts = Table()
    counts.add_column("status")
    counts.add_column("instances", justify="right")
    for status, n in summary.counts.items():
        if n:
            counts.add_row(status, str(n))
    console.print(counts)
    rows = summary_rows(summary)
    if rows:
        table = Table(title="not processed")
        for col in ("UID", "status", "reason"):
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if args.report is not None:
        write_json(args.report, summary.to_dict())
    if summary.interrupted_by is not None:
        raise Interrupted(summary.interrupted_by)
    return summary.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    from covidcxr.pacs.runner import parse_since

    since = parse_since(args.since) if args.since else None
    with _open(args, dry_run=args.dry_run, reprocess=args.reprocess) as runner:
        summary = runner.run(study_uids=args.study, since=since)
    return _present(summary, args, "pacs run (dry run)" if args.dry_run else "pacs run")


def _cmd_watch(args: argparse.Namespace) -> int:
    from covidcxr.pacs.runner import parse_since

    since = parse_since(args.since) if args.since else None

    def on_pass(one: Any) -> None:
        if one.outcomes:
            print(f"covidcxr: watch pass: {json.dumps({k: v for k, v in one.counts.items() if v})}", file=sys.stderr,
                  flush=True)

    with _open(args) as runner:
        summary = runner.watch(interval=args.interval, since=since, on_pass=on_pass)
    return _present(summary, args, "pacs watch")
