"""Left-right mirrored chest X-rays: does the shipped model notice, and why it refuses rather than turns them back.

Issue 19: "Radiographs rotated or flipped are turned upright and say so, or are refused — choose by measurement."
Turned (90/180/270 degrees, upside down, transposed) radiographs are refused by the input-type check
(``input_gate.md``). This benchmark covers the left-right mirror image, which that check cannot tell apart from an
upright frontal CXR; the shipped model's mirror check (:mod:`covidcxr.classification.mirror`) reads the classifier's
own feature map. It reports, side by side in one run on the development CXRs of ``--manifest``:

1. **out of fold** (honest; from the shipped model's ``oof_predictions.csv``, each image scored by a check fitted
   without its patient group): upright images refused, mirror images refused, per source;
2. **the product path** (``artifact.predict`` + ``artifact.gate``, the gate every command, the API and the page
   use) on every image upright and mirrored; the shipped check was fitted on these images, so these figures are
   in-sample — they show the path works, the out-of-fold ones what to expect;
3. **the measurement behind the choice**: how much mirroring moves the classifier (|dP|, label changes), and what
   turning back would have cost (upright images the check mistakes for mirrored would be judged mirrored);
4. the cost of the check (the classifier's feature map fetched in the same pass).

    python benchmarks/input_gate_mirror.py --manifest ../shared/data/cxr/manifest.csv

Results: ``results/input_gate_mirror.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpu_flags, cpu_model


def _rate(x: np.ndarray) -> dict[str, float | int]:
    x = np.asarray(x, bool)
    return {"n": len(x), "k": int(x.sum()), "rate": float(x.mean()) if len(x) else float("nan")}


def oof_refusals(oof: pd.DataFrame, cfg: dict) -> dict:
    """Upright development images the model's learned refusals withhold out of fold: the mirror check, the
    embedding distance, either (the input-type check is cross-validated apart in ``input_gate.md``), by label."""
    mirror = oof["mirror_score"].to_numpy() < cfg["mirror"]["threshold"]
    far = oof["ood_distance"].to_numpy() > cfg["ood"]["threshold"]
    either = mirror | far
    return {"mirror": _rate(mirror), "distance": _rate(far), "either": _rate(either),
            "either_by_label": {str(k): _rate(either[g.index]) for k, g in oof.groupby("label")}}


def quantile_sweep(oof: pd.DataFrame, quantiles: tuple[float, ...] = (0.001, 0.002, 0.003, 0.005, 0.01)) -> list:
    """What other thresholds (quantiles of the out-of-fold upright scores) would have refused, out of fold."""
    up, mi = oof["mirror_score"].to_numpy(), oof["mirror_score_mirrored"].to_numpy()
    rows = []
    for q in quantiles:
        t = float(np.quantile(up, q))
        worst = max(((up[g.index] < t).mean(), str(s)) for s, g in oof.groupby("source"))
        rows.append({"quantile": q, "threshold": t, "upright_refused": _rate(up < t), "mirrored_refused": _rate(mi < t),
                     "worst_source_upright_refused": {"source": worst[1], "rate": float(worst[0])}})
    return rows


def run_path(art, images: list[np.ndarray], batch: int = 32) -> dict[str, np.ndarray]:
    """Probability, label, mirror score and gate of every image through the product path."""
    probs, labels, scores, usable, by_mirror = [], [], [], [], []
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        pred = art.predict(chunk, embeddings=True)
        gates = art.gate(pred, chunk)
        probs.append(pred.prob)
        labels += pred.label
        scores.append(pred.mirror_scores)
        usable += [g.usable for g in gates]
        by_mirror += ["looks_mirrored" in g.reasons for g in gates]
    return {"prob": np.concatenate(probs), "label": np.array(labels), "score": np.concatenate(scores),
            "usable": np.array(usable), "mirror": np.array(by_mirror)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--limit", type=int, default=0, help="use an even spread of this many images (0 = all)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "input_gate_mirror")
    args = p.parse_args(argv)

    from covidcxr.classification.artifact import load_artifact, shipped_model_dir
    from covidcxr.data import read_manifest
    from covidcxr.io.image import load_image

    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    art = load_artifact(shipped_model_dir(), "cpu")
    check = art.mirror_check
    if check is None:
        raise SystemExit(f"{shipped_model_dir()}: the shipped model has no mirror check (tools/ship_model.py)")
    df = read_manifest(args.manifest).reset_index(drop=True)
    if args.limit and args.limit < len(df):
        df = df.iloc[np.linspace(0, len(df) - 1, args.limit).round().astype(int)].reset_index(drop=True)

    # 1. Out of fold, from the shipped evidence.
    oof = pd.read_csv(shipped_model_dir() / "oof_predictions.csv")
    thr = check.threshold_
    oof_up, oof_mi = oof["mirror_score"].to_numpy() < thr, oof["mirror_score_mirrored"].to_numpy() < thr
    oof_by_source = {s: {"upright_refused": _rate(oof_up[g.index]), "mirrored_refused": _rate(oof_mi[g.index])}
                     for s, g in oof.groupby("source")}

    # 2. The product path, upright and mirrored.
    t0 = time.perf_counter()
    images = [load_image(path)[0] for path in df["image"]]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    up = run_path(art, images)
    t_up = time.perf_counter() - t0
    mi = run_path(art, [np.ascontiguousarray(im[:, ::-1]) for im in images])
    # 3. The measurement behind the choice: mirroring moves the classifier.
    both = up["usable"] & mi["usable"]
    dp = np.abs(up["prob"] - mi["prob"])
    changed = up["label"] != mi["label"]
    # Turning back instead: the upright images the check calls mirrored out of fold would be judged mirrored.
    names = df["image"].map(lambda q: Path(str(q)).name)
    called = dict(zip(oof["image"], oof["mirror_score"].to_numpy() < thr, strict=True))
    turned_back_wrong = names.map(called).fillna(False).to_numpy(bool)
    # 4. Cost: the same pass without fetching the feature map.
    n_t = min(64, len(images))
    masks, _ = art.member_masks(images[:n_t])  # segmented once: the check changes only the classifier's pass
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):  # interleaved, best of three (a shared machine)
        for with_check in (False, True):
            art._mirror = check if with_check else None  # with and without the check, timing only
            t0 = time.perf_counter()
            for s in range(0, n_t, 32):
                art.predict(images[s : min(s + 32, n_t)], [m for m in masks[art.segmenter_key][s : s + 32]],
                            embeddings=True)
            timings[with_check].append((time.perf_counter() - t0) / n_t)
    art._mirror = check
    t_with, t_without = min(timings[True]), min(timings[False])

    result = {
        "started": started,
        "command": "python benchmarks/input_gate_mirror.py --manifest " + str(args.manifest)
                   + (f" --limit {args.limit}" if args.limit else ""),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "threads": os.environ.get("OMP_NUM_THREADS", "default")},
        "threshold": thr, "n_images": len(df),
        "out_of_fold": {"upright_refused": _rate(oof_up), "mirrored_refused": _rate(oof_mi),
                        "by_source": oof_by_source, "model_refusals": oof_refusals(oof, art.config),
                        "quantile_sweep": quantile_sweep(oof), "quantile": check.quantile},
        "product_path_in_sample": {
            "upright_refused_as_mirrored": _rate(up["mirror"]), "upright_refused_any_reason": _rate(~up["usable"]),
            "mirrored_refused_as_mirrored": _rate(mi["mirror"]), "mirrored_refused_any_reason": _rate(~mi["usable"]),
            "mirrored_given_a_verdict_that_differs_from_upright": _rate(mi["usable"] & up["usable"] & changed),
        },
        "classifier_under_mirroring": {
            "n": len(dp), "median_abs_dp": float(np.median(dp)), "p95_abs_dp": float(np.quantile(dp, 0.95)),
            "max_abs_dp": float(dp.max()), "label_changes": _rate(changed),
            "label_changes_where_both_usable": _rate(changed[both]) if both.any() else None,
        },
        "turning_back_instead": {
            "upright_images_that_would_be_mirrored_oof": _rate(turned_back_wrong),
            "of_which_label_would_change": int((turned_back_wrong & changed).sum()),
        },
        "cost": {"per_image_with_check_ms": 1000 * t_with, "per_image_without_ms": 1000 * t_without,
                 "images_timed": n_t, "decode_s": t_decode, "upright_path_s": t_up},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _pct(r: dict) -> str:
    return f"{r['k']} of {r['n']} ({100 * r['rate']:.2f} %)"


def _mirror_invariant() -> str:
    """The mirror-invariant alternative measured while choosing (``shortcut.py --stage mirror_invariant``)."""
    path = HERE / "results" / "shortcut_mirror_invariant.json"
    if not path.is_file():
        return "not measured (run `python benchmarks/shortcut.py --stage mirror_invariant`)"
    rows = json.loads(path.read_text())["rows"]
    by = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(f"{row['auc_two_label']:.3f}")
    seeds = " / ".join(str(row["fold_seed"]) for row in rows if row["variant"] == rows[0]["variant"])
    return (f"pooled out-of-fold ROC AUC on two-label rows {' / '.join(by['shipped recipe'])} for the shipped recipe "
            f"vs {' / '.join(by['mirror-averaged embeddings'])} with embeddings averaged over the image and its "
            f"mirror (fold seeds {seeds}; `results/shortcut_mirror_invariant.json`)")


def markdown(r: dict) -> str:
    m, o, pp, cu, tb, c = (r["machine"], r["out_of_fold"], r["product_path_in_sample"], r["classifier_under_mirroring"],
                           r["turning_back_instead"], r["cost"])
    header = (f"`{r['command']}`, {r['started']}; {m['cpu']} ({', '.join(m['flags']) or 'no avx'}), {m['cpus']} "
              f"CPUs, threads {m['threads']}. Shipped model's mirror check, threshold {r['threshold']:.3f}.")
    decision = ("**Decision: a radiograph that looks mirrored is refused, not turned back** (measured below): "
                f"mirroring changes the shipped classifier's label for {_pct(cu['label_changes'])} of the development "
                f"CXRs (median |dP| {cu['median_abs_dp']:.3f}), so a mirrored image must not be judged as it is; and "
                "the check is not certain enough to turn images back: an upright image it mistook for a mirrored one "
                "would be judged mirrored, while refusing it only asks for a new export.")
    missed = 1.0 - o["mirrored_refused"]["rate"]
    residual = (f"Residual risk, stated: out of fold {100 * missed:.0f} % of mirror images are not recognised and "
                "get a verdict; the input-type check cannot see mirroring. A mirror-invariant classifier was "
                f"measured while choosing and not shipped: {_mirror_invariant()}.")
    cost = (f"Cost: {c['per_image_with_check_ms']:.1f} ms per image with the check vs "
            f"{c['per_image_without_ms']:.1f} ms without ({c['images_timed']} images, classifier pass with embeddings "
            "on given masks, best of three interleaved runs; the check is one more output of the same network pass "
            "and a dot product).")
    lines = [
        "# Input gate: left-right mirrored chest X-rays (issue 19)", "", header, "", decision, "",
        "| out of fold (honest: each image scored by a check fitted without its patient group) | refused |",
        "|---|---:|",
        f"| upright development CXRs | {_pct(o['upright_refused'])} |",
        f"| their mirror images | {_pct(o['mirrored_refused'])} |",
        *[f"| source {s}: upright / mirrored | {_pct(v['upright_refused'])} / {_pct(v['mirrored_refused'])} |"
          for s, v in o["by_source"].items()],
        "",
        ("Upright development CXRs withheld out of fold by the model's two learned refusals: mirror check "
         f"{_pct(o['model_refusals']['mirror'])}, embedding distance {_pct(o['model_refusals']['distance'])}, either "
         f"{_pct(o['model_refusals']['either'])}; by label "
         + ", ".join(f"{k} {_pct(v)}" for k, v in o["model_refusals"]["either_by_label"].items())
         + ". The input-type check withholds its own share (`input_gate.md`). A withheld image gets no result, "
         "never a wrong one; a share that differs by label means the gate withholds more of one class."),
        "",
        (f"Threshold choice (out of fold; shipped: the {100 * o['quantile']:g} % quantile of upright scores). "
         "Mirrored exports are rare and real images are every study, so few real images are traded for the mirror "
         "images caught:"),
        "",
        "| quantile | threshold | upright refused | worst source, upright refused | mirror images refused |",
        "|---:|---:|---:|---|---:|",
        *[f"| {100 * q['quantile']:g} % | {q['threshold']:.2f} | {_pct(q['upright_refused'])} | "
          f"{q['worst_source_upright_refused']['source']}: {100 * q['worst_source_upright_refused']['rate']:.2f} % | "
          f"{_pct(q['mirrored_refused'])} |" for q in o["quantile_sweep"]],
        "",
        "| product path (`predict` + `gate`; in-sample: the shipped check was fitted on these images) | n |",
        "|---|---:|",
        f"| upright refused as mirrored | {_pct(pp['upright_refused_as_mirrored'])} |",
        (f"| upright refused for any reason (input type, lung QC, distance, mirror) | "
         f"{_pct(pp['upright_refused_any_reason'])} |"),
        f"| mirrored refused as mirrored | {_pct(pp['mirrored_refused_as_mirrored'])} |",
        f"| mirrored refused for any reason | {_pct(pp['mirrored_refused_any_reason'])} |",
        (f"| mirrored given a verdict whose label differs from the upright image's | "
         f"{_pct(pp['mirrored_given_a_verdict_that_differs_from_upright'])} |"),
        "",
        "| the measurement behind the choice | value |",
        "|---|---:|",
        (f"| classifier P(covid) upright vs mirrored: median / 95th pct / max abs difference | "
         f"{cu['median_abs_dp']:.3f} / {cu['p95_abs_dp']:.3f} / {cu['max_abs_dp']:.3f} |"),
        f"| label changes under mirroring | {_pct(cu['label_changes'])} |",
        (f"| turning back instead: upright images that would be judged mirrored (out of fold) | "
         f"{_pct(tb['upright_images_that_would_be_mirrored_oof'])}, label changed for "
         f"{tb['of_which_label_would_change']} |"),
        "", cost, "", residual, "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
