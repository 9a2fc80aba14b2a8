"""Every test metric, with patient-bootstrap CIs, for a model whose per-image probabilities were saved.

`benchmarks/classification.py --save-embeddings` stores each image's probability next to its embedding. This
script re-evaluates those probabilities at the model's validation-chosen threshold with the same evaluation code
(`covidcxr.evaluate.evaluate_predictions`), so the full metric set (accuracy, sensitivity, specificity, PPV, NPV,
F1, ROC AUC, PR AUC, ECE; overall, per source, per view, sources with both labels) can be reported without
re-training.

Usage: python benchmarks/classification_full_metrics.py --embeddings NPZ --threshold T [--manifest M]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import evaluate_predictions
from covidcxr.evaluation.report import format_metrics_table
from covidcxr.io.files import json_safe

HERE = Path(__file__).resolve().parent




def main(argv: list[str] | None = None) -> int:
    """Evaluate the saved test-split probabilities and write JSON + Markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, required=True, help="npz from classification.py --save-embeddings")
    p.add_argument("--threshold", type=float, required=True, help="the model's threshold (from its config.json)")
    p.add_argument("--manifest", type=Path, default=HERE.parent.parent / "shared" / "data" / "cxr" / "manifest.csv",
                   help="manifest for the source_has_both_labels column (optional)")
    p.add_argument("--split", default="test")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--name", default="classification_best_full")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    z = np.load(args.embeddings, allow_pickle=False)
    df = pd.DataFrame({k: z[k] for k in ("image", "patient_id", "label", "source", "view", "split", "prob")})
    df["y"] = (df["label"] == "covid").astype(int)
    if args.manifest.is_file():
        flags = pd.read_csv(args.manifest, usecols=["image", "source_has_both_labels"])
        flags["key"] = flags["image"].map(lambda s: Path(s).name)
        df["key"] = df["image"].map(lambda s: Path(s).name)
        df = df.merge(flags[["key", "source_has_both_labels"]], on="key", how="left").drop(columns="key")
    rows = df[df["split"] == args.split].reset_index(drop=True)
    result = evaluate_predictions(rows, args.threshold, n_boot=args.n_boot,
                                  title=f"{args.embeddings.name}, split {args.split}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.results_dir / f"{args.name}.json"
    payload = {"embeddings": str(args.embeddings), "model_hash": str(z["model_hash"]), "threshold": args.threshold,
               "split": args.split, "result": result}
    out_json.write_text(json.dumps(json_safe(payload), indent=2, default=str))
    header = (f"Model hash {z['model_hash']}; threshold {args.threshold:.4f} (chosen on validation); split "
              f"`{args.split}`; 95 % patient-bootstrap CIs ({args.n_boot} replicates); ECE {result['ece']:.3f}.")
    command = (f"Command: `python benchmarks/classification_full_metrics.py --embeddings {args.embeddings} "
               f"--threshold {args.threshold}`")
    md = [f"# Every test metric: {args.embeddings.name}", "", header, "", command, "", format_metrics_table(result)]
    (args.results_dir / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_json} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
