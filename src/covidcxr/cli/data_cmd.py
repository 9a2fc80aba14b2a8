"""``covidcxr data``: build, check and split manifests; make the synthetic demo cohort."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidcxr.errors import ManifestError

if TYPE_CHECKING:  # pandas only inside the commands: ``covidcxr --help`` stays light
    import pandas as pd

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``data`` command group (manifest, check, split, synth).

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    data = subparsers.add_parser("data", help="build, check and split manifests; synthetic demo data")
    sub = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)

    p = sub.add_parser("manifest", help="make a manifest from a folder with covid/ and non_covid/ sub-folders")
    p.add_argument("folder", type=Path, help="folder holding covid/ and non_covid/")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument(
        "--patient-regex",
        default=None,
        help="regex searched in the path below the class folder; group 'patient' (or group 1) is the patient id "
        "(default: the file stem)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=_cmd_manifest)

    p = sub.add_parser("check", help="validate a manifest, print counts and near-duplicates")
    p.add_argument("manifest", type=Path)
    _add_duplicate_args(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("split", help="add a patient-level train/val/test split column")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new manifest CSV (never the input)")
    p.add_argument("--val", type=float, default=0.15, help="fraction of patients for validation (default 0.15)")
    p.add_argument("--test", type=float, default=0.15, help="fraction of patients for testing (default 0.15)")
    p.add_argument("--group-col", default=None, help="column whose equal values stay together (e.g. split_group)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_duplicate_args(p)
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("synth", help="write the synthetic demo cohort (images, lung masks, manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--patients", type=int, default=200, help="number of patients (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--dicom-fraction", type=float, default=0.3, help="share of images written as DICOM")
    p.add_argument("--plant-marker", type=float, default=0.0, metavar="STRENGTH",
                   help="plant a shortcut, STRENGTH in [0, 1]: each site's images carry its own burned-in mark and "
                        "the sites' COVID-19 prevalence is pushed apart (0.85 / 0.10 / 0.40 at 1), so a model can "
                        "score by the mark (default 0: none)")
    p.set_defaults(func=_cmd_synth)


def _add_duplicate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate image check")
    p.add_argument(
        "--dup-threshold", type=float, default=0.97, help="thumbnail correlation counted as a duplicate (0.97)"
    )


def _console() -> Any:
    from rich.console import Console

    # Piped output (files, CI logs) would otherwise wrap long source names at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _print_table(console: Any, table: pd.DataFrame, title: str) -> None:
    import pandas as pd
    from rich.table import Table

    console.print(title, soft_wrap=True)  # a Table title would wrap at the table's width
    rich_table = Table()
    for col in table.columns:
        numeric = pd.api.types.is_numeric_dtype(table[col])
        rich_table.add_column(str(col), justify="right" if numeric else "left")
    last = len(table) - 1
    for i, row in enumerate(table.itertuples(index=False)):
        rich_table.add_row(*(str(v) for v in row), end_section=i == last - 1)
    console.print(rich_table)


def _print_duplicates(console: Any, df: pd.DataFrame, threshold: float) -> None:
    from covidcxr.data.duplicates import find_near_duplicates

    start = time.perf_counter()
    pairs = find_near_duplicates(df, threshold=threshold)
    seconds = time.perf_counter() - start
    root = df.attrs.get("root")

    def short(path: str) -> str:
        return str(Path(path).relative_to(root)) if root and path.startswith(root + "/") else path

    if "cross_split" in pairs.columns:
        leaks = pairs[pairs["cross_split"]]
        console.print(
            f"near-duplicates (r >= {threshold:g}) between different patients: {len(pairs)}, "
            f"in different splits: [bold]{len(leaks)}[/bold] ({len(df)} images, {seconds:.1f} s)"
        )
        shown = leaks
    else:
        console.print(
            f"near-duplicates (r >= {threshold:g}) between different patients: [bold]{len(pairs)}[/bold] "
            f"({len(df)} images, {seconds:.1f} s)"
        )
        shown = pairs
    if len(shown):
        cols = [c for c in ("split_a", "split_b", "patient_a", "patient_b", "corr") if c in shown.columns]
        table = shown.assign(image_a=shown["image_a"].map(short), image_b=shown["image_b"].map(short))
        _print_table(console, table[["image_a", "image_b", *cols]].head(50), "near-duplicate pairs (first 50)")


def _cmd_manifest(args: argparse.Namespace) -> int:
    from covidcxr.data.manifest import (
        check_output_path,
        manifest_from_folder,
        summarize,
        validate_manifest,
        write_manifest,
    )

    check_output_path(args.out, force=args.force)
    df = manifest_from_folder(args.folder, patient_regex=args.patient_regex)
    for warning in validate_manifest(df, args.folder):
        log.warning("%s", warning)
    write_manifest(df, args.out, force=args.force)
    console = _console()
    _print_table(console, summarize(df), f"{args.out}: {len(df)} images")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from covidcxr.data.manifest import REQUIRED_COLUMNS, read_manifest, summarize, validate_manifest
    from covidcxr.data.split import split_balance

    start = time.perf_counter()
    df = read_manifest(args.manifest, validate=False)
    console = _console()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        warnings = validate_manifest(df, args.manifest)
    except ManifestError as exc:
        problems = exc.problems
    if all(c in df.columns for c in ("label", "patient_id")) and len(df):
        _print_table(console, summarize(df), f"{args.manifest}: {len(df)} images")
    if "split" in df.columns and not problems:
        warnings += split_balance(df)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if problems:
        # main() prints the full list on stderr and exits with 2.
        raise ManifestError(args.manifest, problems)
    if not args.no_duplicates and all(c in df.columns for c in REQUIRED_COLUMNS):
        _print_duplicates(console, df, args.dup_threshold)
    console.print(f"manifest OK ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from covidcxr.data.manifest import check_output_path, read_manifest, summarize, write_manifest
    from covidcxr.data.split import patient_split

    start = time.perf_counter()
    df = read_manifest(args.manifest)
    check_output_path(args.out, force=args.force, input_manifest=df.attrs["manifest"])
    if "split" in df.columns:
        log.warning("%s: replacing its existing 'split' column", args.manifest)
    out = patient_split(df, val=args.val, test=args.test, group_col=args.group_col, seed=args.seed)
    write_manifest(out, args.out, force=args.force)
    console = _console()
    _print_table(console, summarize(out, by=["split"]), f"{args.out}: seed {args.seed}")
    if not args.no_duplicates:
        _print_duplicates(console, out, args.dup_threshold)
    console.print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from covidcxr.data.manifest import read_manifest, summarize
    from covidcxr.data.synth import make_cohort

    manifest = make_cohort(
        args.out, n_patients=args.patients, seed=args.seed, size=args.size, dicom_fraction=args.dicom_fraction,
        plant_marker=args.plant_marker,
    )
    console = _console()
    _print_table(console, summarize(read_manifest(manifest)), f"{manifest}")
    return 0
