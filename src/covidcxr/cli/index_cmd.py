"""``covidcxr index embed | build | add | evaluate | info`` and ``covidcxr search``: similar-case search (thin CLI)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli._model import DEVICE_HELP, MODEL_HELP, decode_threads, model_dir
from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``index`` command group and the ``search`` command.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    idx = subparsers.add_parser("index", help="similar-case index: embed, build, add, evaluate, info")
    sub = idx.add_subparsers(title="index commands", metavar="COMMAND", required=True)

    p = sub.add_parser("embed", help="embed a manifest into resumable shards, on one or many processes/GPUs/nodes",
                       description="Embed a manifest into a shard folder with Lightning (resumable: finished shards "
                                   "are skipped). Then: covidcxr index build --from-embeddings DIR --out INDEX.")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--manifest", type=Path, required=True, help="manifest CSV (a case_id column is used if present)")
    p.add_argument("--out", type=Path, required=True, help="shard folder (rerun with the same folder to resume)")
    p.add_argument("--split", default="all", help="rows of this split (default all)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per shard (default 4096)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto | cpu | gpu")
    p.add_argument("--devices", default="1", help="processes (CPU) or GPUs per node; 'auto' = all GPUs")
    p.add_argument("--num-nodes", type=int, default=1, help="machines (start with srun/torchrun, see README)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto = ddp with > 1 process)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding threads per process (default: this process's CPUs / devices)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=True,
                   help="go on past unreadable images (the default): each is reported with its reason, the others "
                        "are embedded, and the exit status is 1")
    p.add_argument("--stop-on-bad", dest="skip_bad", action="store_false",
                   help="stop at the first unreadable image instead (exit 2)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("build", help="save a case index: embed a manifest split, or index finished shards")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="manifest CSV (a case_id column is used if present)")
    src.add_argument("--from-embeddings", type=Path, metavar="DIR",
                     help="shard folder of `covidcxr index embed` (no model needed; streamed for archives)")
    p.add_argument("--out", type=Path, required=True, help="index folder to write")
    p.add_argument("--split", default="train", help="rows of this split (default train; 'all' = every row)")
    p.add_argument("--pca-dim", type=int, default=None, help="reduce embeddings to N dimensions (PCA on these rows)")
    p.add_argument("--whiten", action="store_true", help="whiten the PCA output (needs --pca-dim)")
    p.add_argument("--kind", default="auto", choices=("auto", "exact", "hnsw", "ivf", "ivfpq"),
                   help="FAISS index kind (default auto: exact up to 200k cases, HNSW up to 2M, IVF-PQ above)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (ivf, ivfpq; sharded builds)")
    p.add_argument("--thumbnails", action="store_true", help="write 128-px PNG thumbnails into OUT/thumbnails/")
    p.add_argument("--force", action="store_true", help="replace an existing index at --out")
    dist = p.add_argument_group("distributed embedding (Lightning; embeds into shards, then indexes them)")
    dist.add_argument("--devices", default=None, help="processes (CPU) or GPUs per node; 'auto' = all GPUs")
    dist.add_argument("--num-nodes", type=int, default=1, help="machines (start with srun/torchrun, see README)")
    dist.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto | cpu | gpu")
    dist.add_argument("--strategy", default="auto", help="Lightning strategy (auto = ddp with > 1 process)")
    dist.add_argument("--shard-size", type=int, default=4096, help="rows per shard (default 4096)")
    dist.add_argument("--embeddings", type=Path, default=None,
                      help="shard folder to write/resume (default: OUT's sibling .OUT.embeddings)")
    _add_embed_args(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("add", help="embed a manifest and add its cases to an index (same model only)")
    p.add_argument("--index", type=Path, required=True, help="index folder")
    p.add_argument("--model", type=Path, required=True, help="the model the index was built with")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--split", default="all", help="rows of this split (default all)")
    p.add_argument("--skip-existing", action="store_true", help="skip cases already indexed instead of refusing")
    p.add_argument("--thumbnails", action=argparse.BooleanOptionalAction, default=None,
                   help="thumbnails for the new cases (default: when the index has thumbnails)")
    _add_embed_args(p)
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("evaluate", help="retrieval quality: train split indexed, test split queried, leave-patient-out")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--manifest", type=Path, required=True, help="manifest with a split column (else split by patient)")
    p.add_argument("--out", type=Path, default=None, help="folder for retrieval.json and retrieval.md")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours of the kNN vote and mAP cut-off (default 10)")
    p.add_argument("--pca-dim", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=1000, help="patient-bootstrap replicates for AUC CIs (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    _add_embed_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("info", help="print an index's header and label counts")
    p.add_argument("index", type=Path)
    p.set_defaults(func=_cmd_info)

    p = subparsers.add_parser("search", help="find the most similar indexed cases of an image")
    p.add_argument("image", type=Path, help="PNG/JPEG/TIFF/DICOM file")
    p.add_argument("--index", type=Path, required=True, help="index folder")
    p.add_argument("--model", type=Path, default=None, help="model artifact (default: the one recorded in the index)")
    p.add_argument("-k", "--k", type=int, default=5, help="number of similar cases (default 5)")
    p.add_argument("--exclude-patient", action="append", default=None, metavar="ID",
                   help="skip this patient's cases (repeatable)")
    p.add_argument("--sheet", type=Path, default=None, help="write a contact sheet PNG (query + neighbours)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_cmd_search)


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding threads (default: one per CPU)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=True,
                   help="go on past unreadable images (the default): each is reported with its reason, the others "
                        "are embedded, and the exit status is 1")
    p.add_argument("--stop-on-bad", dest="skip_bad", action="store_false",
                   help="stop at the first unreadable image instead (exit 2)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _not_in(where: Path) -> str:
    return f" and are not in {where} (listed there: build info / unreadable-*.json)"


def _report_unreadable(unreadable: list[dict[str, Any]], summary: str) -> int:
    """One line per image left out (by manifest row or split), ``summary`` after them, and the batch exit status
    (README: 1 when any input could not be read)."""
    from covidcxr.service.jobs import batch_exit_code

    for bad in unreadable:
        where = f"manifest row {bad['row']}" if "row" in bad else f"{bad['split']} split"
        log.error("left out (%s): %s", where, bad["reason"])
    if unreadable:
        log.error("%d image(s) could not be read%s", len(unreadable), summary)
    return batch_exit_code(["error"] * len(unreadable))


def _summary(index: Any) -> str:
    counts = index.label_counts()
    labels = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (f"{len(index)} cases of {index.n_patients_} patients ({labels}); {index.kind_} "
            f"index, {index.dim_}-d -> {index.index_dim_}-d; model {str(index.model_hash)[:12]}")


def _embed(args: argparse.Namespace, out: Path) -> Any:
    from covidcxr.service import jobs

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    per_process = max(1, decode_threads(None) // (devices if isinstance(devices, int) else 1))
    summary = jobs.embed_shards(args.model, args.manifest, out, split=args.split, shard_size=args.shard_size,
                                accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                                strategy=args.strategy, batch_size=args.batch_size,
                                num_workers=args.num_workers or per_process, skip_bad=args.skip_bad,
                                progress=args.progress)
    if summary.rank == 0:  # every process runs the command; rank 0 reports
        _console().print(f"embeddings: {summary.directory} ({summary.n_rows} rows in {summary.n_shards} shard(s); "
                         f"this run embedded {summary.embedded}, {summary.skipped_existing} were already done; "
                         f"{summary.world_size} process(es), {summary.seconds:.1f} s)")
    return summary


def _cmd_embed(args: argparse.Namespace) -> int:
    args.model = model_dir(args.model)
    summary = _embed(args, args.out)
    return _report_unreadable(summary.unreadable, _not_in(args.out)) if summary.rank == 0 else 0


def _cmd_build(args: argparse.Namespace) -> int:
    from covidcxr.service import jobs

    sharded = args.devices is not None or args.embeddings is not None or args.num_nodes > 1
    if sharded and args.manifest is not None:
        if args.thumbnails:
            raise ConfigError("--thumbnails is not available with distributed embedding; add them with "
                              "`covidcxr index build --manifest` on one process")
        from covidcxr.service.jobs import check_index_target

        check_index_target(args.out, args.force)
        args.model = model_dir(args.model)
        args.devices = args.devices or "1"
        shards_dir = args.embeddings or args.out.with_name(f".{args.out.name}.embeddings")
        if _embed(args, shards_dir).rank != 0:
            return 0
        args.from_embeddings = shards_dir
    if args.from_embeddings is not None:
        settings = {"pca_dim": args.pca_dim, "whiten": args.whiten}
        if args.nprobe is not None:
            settings["nprobe"] = args.nprobe
        index = jobs.index_from_shards(args.from_embeddings, args.out, force=args.force, kind=args.kind,
                                       **settings)
        console = _console()
        console.print(f"index: {args.out}")
        console.print(_summary(index))
        from covidcxr.retrieval.shards import unreadable_rows

        return _report_unreadable(unreadable_rows(args.from_embeddings), _not_in(args.out))
    args.model = model_dir(args.model)
    index = jobs.build_index(args.model, args.manifest, args.out, split=args.split, device=args.device,
                             pca_dim=args.pca_dim, whiten=args.whiten, kind=args.kind, thumbnails=args.thumbnails,
                             force=args.force, batch_size=args.batch_size,
                             num_workers=decode_threads(args.num_workers), progress=args.progress,
                             skip_bad=args.skip_bad)
    console = _console()
    console.print(f"index: {args.out}")
    console.print(_summary(index))
    return _report_unreadable(index.build_info.get("unreadable", []), _not_in(args.out))


def _cmd_add(args: argparse.Namespace) -> int:
    from covidcxr.service import jobs

    index, n = jobs.add_to_index(args.index, args.model, args.manifest, split=args.split, device=args.device,
                                 thumbnails=args.thumbnails, skip_existing=args.skip_existing,
                                 batch_size=args.batch_size, num_workers=decode_threads(args.num_workers),
                                 progress=args.progress, skip_bad=args.skip_bad)
    console = _console()
    console.print(f"added {n} case(s) to {args.index}")
    console.print(_summary(index))
    additions = index.build_info.get("additions", [])
    return _report_unreadable(additions[-1].get("unreadable", []) if n and additions else [], _not_in(args.index))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from covidcxr.io.files import write_json
    from covidcxr.retrieval.report import retrieval_markdown, retrieval_table
    from covidcxr.service import jobs

    if args.out is not None and args.out.is_file():
        raise ConfigError(f"{args.out}: --out must be a folder")
    args.model = model_dir(args.model)
    result, model_hash = jobs.evaluate_retrieval(
        args.model, args.manifest, device=args.device, k=args.k, pca_dim=args.pca_dim, n_boot=args.n_boot,
        seed=args.seed, batch_size=args.batch_size, num_workers=decode_threads(args.num_workers),
        progress=args.progress, skip_bad=args.skip_bad)
    header, rows = retrieval_table(result)
    table = Table(title=f"retrieval quality: {args.model.name} on {args.manifest.name} (train indexed, test queried, "
                        "leave-patient-out)")
    for col in header:
        table.add_column(col, justify="left" if col == "subset" else "right")
    for row in rows:
        table.add_row(*row)
    console = _console()
    console.print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "retrieval.json", result)
        (args.out / "retrieval.md").write_text(retrieval_markdown(
            result, intro=f"Model `{args.model}` ({model_hash[:12]}), manifest `{args.manifest}`."))
        console.print(f"wrote {args.out / 'retrieval.json'} and retrieval.md")
    listed = f" (the files are listed in {args.out / 'retrieval.json'})" if args.out is not None else ""
    return _report_unreadable(result.get("unreadable", []),
                              f": the figures are of the other {result['embedding']['images']}{listed}")


def _cmd_info(args: argparse.Namespace) -> int:
    from covidcxr.retrieval.index import CaseIndex

    index = CaseIndex.load(args.index)
    console = _console()
    console.print(f"index: {args.index}")
    console.print(_summary(index))
    console.print_json(json.dumps(index.build_info, default=str))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from rich.table import Table

    from covidcxr.service import jobs

    found = jobs.search(args.image, args.index, args.model, k=args.k, exclude_patients=args.exclude_patient,
                        sheet=args.sheet, device=args.device)
    if args.json:
        print(json.dumps({"image": str(args.image), "prob": found.prob, "label": found.label,
                          "no_result_reason": found.no_result_reason, "threshold": found.threshold,
                          "matches": found.rows,
                          "sheet": str(args.sheet) if args.sheet else None}, indent=2))
        return 0
    console = _console()
    excluded = f"; excluding patient(s) {', '.join(args.exclude_patient)}" if args.exclude_patient else ""
    verdict = (f"P(covid) {found.prob:.3f} -> {found.label} (threshold {found.threshold:.3f})"
               if found.prob is not None else found.no_result_reason)
    table = Table(title=f"{args.image.name}: {verdict}{excluded}")
    for col in ("rank", "similarity", "case", "patient", "label", "source", "view"):
        table.add_column(col, justify="right" if col in ("rank", "similarity") else "left")
    for r in found.rows:
        table.add_row(str(r["rank"]), f"{r['similarity']:.4f}", r["case_id"], r["patient_id"], r["label"],
                      str(r["source"] or ""), str(r["view"] or ""))
    console.print(table)
    if args.sheet is not None:
        console.print(f"contact sheet: {args.sheet}")
    return 0
