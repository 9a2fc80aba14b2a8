"""Input gate: real CXRs wrongly refused vs non-frontal inputs let through, in two parts.

``--part type`` (default; issue 19): the input-type check (:mod:`covidcxr.classification.input_type`, independent
of the COVID-19 classifier). Cross-validated BY PATIENT (5 folds, StratifiedGroupKFold over patient groups; every
rotated/flipped copy of an image stays in its image's fold) on the development frontal CXRs (and each of them turned
by 90/180/270 degrees, flipped upside down, transposed), the non-frontal chest images of ``--noncxr`` (laterals,
axial and coronal CT, each also turned), synthetic CXRs (``data.synth.draw_cxr``), matplotlib's sample pictures
(with crops) and synthetic pictures (``data.synth.draw_picture``). Targets: >= 99 % of non-frontal inputs refused,
<= 1 % of development CXRs refused, no turned CXR accepted. It also times the check against one full analysis
with the shipped model. ``--install`` then fits on everything and writes ``weights/input_type.{npz,json}``.
Results: ``results/input_gate.{json,md}``.

``--part embedding`` (earlier): the gate of the shipped classifier (``covidcxr.classification.ood``) withholds the
verdict on lung-QC failures and on images whose embedding lies far from every training case; results
``results/input_gate_embedding.{json,md}``. This part embeds the development CXRs with the shipped model, fits the
distance reference on the model's own training rows with the threshold at a quantile of its validation rows'
distances (``--install`` writes it into the shipped model), and reports

* the share of real development CXRs refused (per split and per source; target <= 1 %), and
* which non-CXR inputs pass (target: none): the photographs and pictures matplotlib ships, a 16-bit MRI slice it
  ships, synthetic non-chest pictures, blank and noise images, plus real CXRs rotated by 90 degrees (reported
  apart: a frontal CXR on its side is not a usable input either).

Usage::

    python benchmarks/input_gate.py --part type --install
    python benchmarks/input_gate.py --part embedding --manifest ../shared/data/cxr/manifest.csv --install
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpu_flags, cpu_model


def non_cxr_images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs that are not frontal chest X-rays, as float32 grey images in [0, 1]."""
    import matplotlib
    from PIL import Image

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    out: dict[str, np.ndarray] = {}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        img = Image.open(sample / name).convert("L")
        out[f"matplotlib {name}"] = np.asarray(img, dtype=np.float32) / 255.0
    with gzip.open(sample / "s1045.ima.gz") as fh:
        mri = np.frombuffer(fh.read(), np.uint16).reshape(256, 256).astype(np.float32)
    out["matplotlib s1045.ima (MRI slice)"] = mri / mri.max()
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    out["blank black"] = np.zeros((512, 512), np.float32)
    out["blank white"] = np.ones((512, 512), np.float32)
    out["blank grey"] = np.full((512, 512), 0.5, np.float32)
    out["uniform noise"] = rng.random((512, 512), dtype=np.float32)
    out["gaussian blobs"] = np.clip(sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
                                        for cx, cy in rng.random((6, 2))), 0, 1).astype(np.float32)
    out["horizontal gradient"] = xx.astype(np.float32)
    out["checkerboard"] = (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2).astype(np.float32)
    out["rings"] = (0.5 + 0.5 * np.sin(40 * np.hypot(xx - 0.5, yy - 0.5))).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("type", "embedding"), default="type")
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--noncxr", type=Path, default=Path("../shared/data/noncxr/manifest.csv"))
    p.add_argument("--quantile", type=float, default=0.995)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--analysis-images", type=int, default=5, help="images timed through one full analysis")
    p.add_argument("--install", action="store_true",
                   help="type: write the fitted check into the package; embedding: the reference into the model")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.part == "type":
        from _input_type import run_input_type

        return run_input_type(args, argv)
    args.out = args.out or HERE / "results" / "input_gate_embedding.json"

    from covidcxr.classification.artifact import load_artifact, shipped_model_dir
    from covidcxr.classification.loop import predict_manifest
    from covidcxr.classification.ood import BLOCKING_QC_FLAGS, fit_reference, gate
    from covidcxr.data.manifest import read_manifest
    from covidcxr.device import available_cpus
    from covidcxr.io.files import write_json
    from covidcxr.runtime import onnx_runtime_version
    t0 = time.perf_counter()
    art = load_artifact(shipped_model_dir(), "cpu")
    df = read_manifest(args.manifest)
    oof_file = shipped_model_dir() / "oof_predictions.csv"
    if oof_file.is_file():
        # A model calibrated out of fold (tools/ship_model.py): its reference is fitted there, on every development
        # image, with the threshold from out-of-fold distances; here each image's distance is its out-of-fold one.
        if args.install:
            raise SystemExit(f"{shipped_model_dir()}: the input-gate reference of a model calibrated out of fold is "
                             "fitted by tools/ship_model.py; run it instead of --install")
        ref = art.ood_reference
        oof = pd.read_csv(oof_file).set_index("image")["ood_distance"]
        df["split"] = "train"
        pred, emb = predict_manifest(art, df, embeddings=True, num_workers=2, mask_dir=Path("runs/shipped/masks"))
        train, val = np.ones(len(pred), bool), np.zeros(len(pred), bool)
        d_all = pred["image"].map(lambda q: oof[Path(str(q)).name]).to_numpy(dtype=np.float64)
    else:
        val_names = set(pd.read_csv(shipped_model_dir() / "val_predictions.csv")["image"].map(lambda q: Path(q).name))
        df["split"] = np.where(df["image"].map(lambda q: Path(q).name).isin(val_names), "val", "train")
        pred, emb = predict_manifest(art, df, embeddings=True, num_workers=2, mask_dir=Path("runs/shipped/masks"))
        train, val = (pred["split"] == "train").to_numpy(), (pred["split"] == "val").to_numpy()
        ref, _ = fit_reference(emb[train], emb[val], quantile=args.quantile, k=args.k)
        # Training rows are their own neighbours: leave each one out of its own reference.
        d_all = ref.distances(emb)
        d_all[train] = ref.self_distances()
    qc = [f.split(";") if f else [] for f in pred["qc_flags"]]
    gates = [gate(q, float(d), ref.threshold) for q, d in zip(qc, d_all, strict=True)]
    pred["refused"] = [not g.usable for g in gates]
    pred["reasons"] = [";".join(g.reasons) for g in gates]
    pred["refused_qc"] = [any(f in BLOCKING_QC_FLAGS for f in q) for q in qc]
    pred["refused_ood"] = d_all > ref.threshold

    rng = np.random.default_rng(0)
    others = non_cxr_images(rng)
    rot_rows = df[df["split"] == ("val" if val.any() else "train")].head(20)
    from covidcxr.io.image import load_image

    rotated = {f"rotated 90: {Path(r).name}": np.rot90(load_image(r)[0]).copy() for r in rot_rows["image"]}
    results = []
    for group, images in (("non_cxr", others), ("rotated_cxr", rotated)):
        out = art.predict(list(images.values()), embeddings=True)
        dist = ref.distances(out.embeddings)
        checked = [gate(q, float(d), ref.threshold) for q, d in zip(out.qc_flags, dist, strict=True)]
        for (name, _), g in zip(images.items(), checked, strict=True):
            results.append({"group": group, "input": name, "passed": g.usable, "reasons": g.reasons,
                            "distance": g.distance})

    def rate(mask: np.ndarray, col: str = "refused") -> dict[str, float | int]:
        sub = pred[mask]
        return {"n": len(sub), "refused": int(sub[col].sum()), "rate": round(float(sub[col].mean()), 4)}

    by_source = {s: rate((pred["source"] == s).to_numpy()) for s in sorted(pred["source"].unique())}
    non = [r for r in results if r["group"] == "non_cxr"]
    rot = [r for r in results if r["group"] == "rotated_cxr"]
    report = {
        "benchmark": "input_gate",
        "command": "python benchmarks/input_gate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "threads": available_cpus(),
                    "runtime": f"onnxruntime {onnx_runtime_version()} float32"},
        "model": art.weights_hash[:12],
        "reference": {"n_train": int(train.sum()), "quantile": args.quantile, "k": args.k,
                      "out_of_fold": not val.any(),
                      "threshold": ref.threshold, "blocking_qc_flags": list(BLOCKING_QC_FLAGS)},
        "dev_cxr_refused": {"all": rate(np.ones(len(pred), bool)),
                            **({"train (leave-one-out)": rate(train), "val": rate(val)} if val.any() else {}), "qc_only": rate(np.ones(len(pred), bool), "refused_qc"),
                            "ood_only": rate(np.ones(len(pred), bool), "refused_ood"), "per_source": by_source},
        "non_cxr": {"n": len(non), "passed": sum(r["passed"] for r in non), "inputs": non},
        "rotated_cxr": {"n": len(rot), "passed": sum(r["passed"] for r in rot), "inputs": rot},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    args.out.with_suffix(".md").write_text(_markdown(report))
    print(args.out.with_suffix(".md").read_text())
    if args.install:
        entry = ref.save(shipped_model_dir())
        entry.update(quantile=args.quantile, fitted_on="training rows of the shipped model (validation: threshold)",
                     benchmark="benchmarks/results/input_gate_embedding.md")
        cfg_path = shipped_model_dir() / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["ood"] = entry
        write_json(cfg_path, cfg)
        card = shipped_model_dir() / "MODEL_CARD.md"
        text = card.read_text().split("\n## Input gate")[0].rstrip() + "\n\n" + _card_section(report)
        card.write_text(text)
        print(f"reference written to {shipped_model_dir()} (threshold {ref.threshold:.4f})")
    return 0


def _card_section(r: dict) -> str:
    d = r["dev_cxr_refused"]
    return "\n".join([
        "## Input gate (no verdict on what is not a usable frontal chest X-ray)",
        (f"Results are withheld on the lung-QC flags {', '.join(r['reference']['blocking_qc_flags'])} and when the "
         f"image's embedding lies farther from its {r['reference']['k']} nearest training cases than "
         f"{r['reference']['threshold']:.4f} (mean cosine distance; the {r['reference']['quantile']:.1%} quantile "
         f"on validation; reference `ood_reference.npz`, {r['reference']['n_train']} training embeddings). Refused: "
         f"{d['all']['refused']} of {d['all']['n']} development CXRs ({d['all']['rate']:.2%}; ieee8023 "
         f"{d['per_source'].get('ieee8023/covid-chestxray-dataset', {}).get('rate', float('nan')):.2%}); "
         f"non-CXR inputs let through: {r['non_cxr']['passed']} of {r['non_cxr']['n']}; real CXRs rotated by 90 "
         f"degrees: {r['rotated_cxr']['passed']} of {r['rotated_cxr']['n']} "
         "(`benchmarks/results/input_gate_embedding.md`). Refit after retraining: "
         "`python benchmarks/input_gate.py --part embedding --install`."),
        "",
    ])




def _markdown(r: dict) -> str:
    d = r["dev_cxr_refused"]
    lines = [
        "# Input gate of the shipped classifier",
        "",
        (f"`{r['command']}`, {r['date']}; {r['machine']['cpu_model']} ({', '.join(r['machine']['cpu_flags'])}), "
         f"{r['machine']['threads']} threads; model {r['model']}."),
        "",
        (f"Reference: {r['reference']['n_train']} training embeddings, k = {r['reference']['k']}, threshold "
         f"{r['reference']['threshold']:.4f} = the {r['reference']['quantile']:.1%} quantile of the "
         + ("out-of-fold" if r["reference"].get("out_of_fold") else "validation rows'") + " "
         f"distances; blocking QC flags: {', '.join(r['reference']['blocking_qc_flags'])}."),
        "",
        "| real development CXRs | n | refused | rate |", "|---|---:|---:|---:|",
        *[f"| {k} | {v['n']} | {v['refused']} | {v['rate']:.2%} |" for k, v in d.items() if k != "per_source"],
        *[f"| source: {k} | {v['n']} | {v['refused']} | {v['rate']:.2%} |" for k, v in d["per_source"].items()],
        "",
        (("Each development image is scored by its out-of-fold distance (to the training images of the fold that did "
          "not see it), the distance the threshold was fitted on (`tools/ship_model.py`). " if r["reference"].get(
              "out_of_fold") else "Training rows are scored leave-one-out (an image is not its own neighbour); "
          "validation rows set the threshold, so their rate is the quantile by construction. ")
         + "No CXR from a hospital outside these collections was available."),
        "",
        (f"Non-CXR inputs let through: **{r['non_cxr']['passed']} of {r['non_cxr']['n']}**; real CXRs rotated by 90 "
         f"degrees let through: {r['rotated_cxr']['passed']} of {r['rotated_cxr']['n']}."),
        "",
        "| input | passed | reasons | distance |", "|---|---|---|---:|",
        *[f"| {x['input']} | {'yes' if x['passed'] else 'no'} | {', '.join(x['reasons'])} | "
          f"{x['distance']:.4f} |" for x in r["non_cxr"]["inputs"] + r["rotated_cxr"]["inputs"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
