"""``covidcxr serve`` (web page + REST API) and ``covidcxr explain`` (Grad-CAM heat map of one image)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from covidcxr.cli._model import DEVICE_HELP, MODEL_HELP, model_dir


def register(subparsers: Any) -> None:
    """Add the ``serve`` and ``explain`` commands.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    p = subparsers.add_parser(
        "serve",
        help="serve the radiologist's web page and the REST API for a model and case index",
        description="Load the model and index once and serve the page at / and the API at /api/v1 "
        "(OpenAPI docs at /docs). Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--index", type=Path, required=True, help="case index folder built with this model")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload in MB (default 50)")
    p.add_argument("--keep-uploads", type=Path, default=None, metavar="DIR",
                   help="keep uploads in DIR under server-generated names (default: nothing is kept)")
    p.add_argument("-k", type=int, default=8, help="similar cases shown per image (default 8)")
    p.add_argument("--segmenter", type=Path, default=None,
                   help="lung U-Net weights (default: the model's own segmenter, else the shipped one)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                   help="file holding the API access token (default: $COVIDCXR_TOKEN; without either the API is "
                        "open, which is only allowed on a loopback --host); clients send 'Authorization: Bearer "
                        "<token>'")
    p.add_argument("--show-real-ids", action="store_true",
                   help="show the archive's real case and patient ids of similar cases (default: keyed pseudonyms)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="analyses waiting beyond the running one before new uploads get 503 (default 8)")
    p.add_argument("--ssl-certfile", type=Path, default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (with --ssl-keyfile); or put a TLS reverse proxy in front")
    p.add_argument("--ssl-keyfile", type=Path, default=None, metavar="PEM", help="private key of --ssl-certfile")
    p.add_argument("--max-side", type=int, default=4300, metavar="PX",
                   help="longest side of a decoded upload; larger images are reduced while decoding (default 4300)")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser(
        "explain",
        help="write a Grad-CAM heat map overlay of each image and its share of heat inside the lungs",
    )
    p.add_argument("images", type=Path, nargs="+", help="PNG, JPEG, TIFF or DICOM chest X-rays")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mask", type=Path, default=None, help="lung mask image of the one image (default: predicted)")
    p.add_argument("--segmenter", type=Path, default=None,
                   help="lung U-Net weights (default: the model's own segmenter, else the shipped one)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_explain)


def serve_settings(args: argparse.Namespace, environ: Any = None) -> Any:
    """The :class:`~covidcxr.service.analysis.ServeSettings` of parsed ``serve`` arguments, checked for exposure.

    Raises:
        ConfigError: Bad values, an unreadable/empty token file, or a non-loopback host without a token.
    """
    from covidcxr.service.settings import ServeSettings, check_exposure, read_token

    settings = ServeSettings(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                             keep_uploads=args.keep_uploads, k=args.k, segmenter_weights=args.segmenter,
                             device=args.device, token=read_token(args.token_file, environ),
                             show_real_ids=args.show_real_ids, queue_size=args.queue_size, max_side=args.max_side,
                             ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    check_exposure(settings, warn=False)  # serve() warns once about an open loopback server
    return settings


def _cmd_serve(args: argparse.Namespace) -> int:
    from covidcxr.web.app import serve

    settings = serve_settings(args)  # refuses a public host without a token before loading the model
    args.model = model_dir(args.model)
    scheme = "https" if settings.ssl_certfile is not None else "http"
    print(f"covidcxr: serving {args.model} with index {args.index} at {scheme}://{_url_host(args.host)}:{args.port}/ "
          f"({'API token required' if settings.token else 'API open: no token'}; Ctrl+C to stop)", flush=True)
    serve(args.model, args.index, settings)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _cmd_explain(args: argparse.Namespace) -> int:
    from covidcxr.service.explain import explain_files
    from covidcxr.service.jobs import batch_exit_code

    args.model = model_dir(args.model)
    summaries = explain_files(args.images, args.model, args.out, mask_path=args.mask,
                              segmenter_weights=args.segmenter, device=args.device)
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return batch_exit_code([s["status"] for s in summaries])
    for summary in summaries:
        _print_explanation(summary)
    return batch_exit_code([s["status"] for s in summaries])


def _print_explanation(summary: dict[str, Any]) -> None:
    image, energy = summary["image"], summary.get("lung_energy_fraction")
    if summary["status"] != "ok":
        print(f"{image}: {summary['no_result_reason']}")
        return
    print(f"{image}: COVID probability {summary['probability']:.3f} -> {summary['label']} "
          f"(threshold {summary['threshold']:.3f})")
    print("heat inside lungs: " + ("n/a (empty heat map)" if energy is None else f"{energy:.0%}")
          + ("  <- the model looked mostly outside the lungs" if summary["explanation_flags"] else ""))
    if summary["qc_flags"]:
        print("lung QC flags: " + ", ".join(summary["qc_flags"]))
    for name, path in summary["files"].items():
        print(f"  {name}: {path}")
