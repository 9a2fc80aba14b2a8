"""Linear heads on frozen embeddings: the collapsed head is the pipeline, INLP removes a planted site marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidcxr.classification.heads import HeadEnsemble, LinearHead, balance_weights, inlp_projection, oof_margins
from covidcxr.errors import ConfigError, NotFittedError


def _data(seed: int = 0, n: int = 300, d: int = 40):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    source = np.where(rng.random(n) < 0.5, "A", "B")
    both = source == "A"
    x = rng.normal(size=(n, d))
    x[:, 0] += 1.5 * y  # the disease
    x[:, 1] += 2.0 * (source == "B")  # the archive
    return x, y, source, both


@pytest.mark.parametrize("pca", [0, 10])
@pytest.mark.parametrize("rows, inlp", [("all", 0), ("two_label", 0), ("all", 3)])
def test_collapsed_head_equals_its_pipeline(pca: int, rows: str, inlp: int) -> None:
    x, y, source, both = _data()
    head = LinearHead(C=0.5, pca=pca, rows=rows, inlp=inlp, balance=True).fit(x, y, source, both)
    from sklearn.linear_model import LogisticRegression

    # Refit the logistic regression on the head's own representation: same decision values as the collapsed map.
    h = head.transform(x)
    fit_rows = both if rows == "two_label" else np.ones(len(y), bool)
    clf = LogisticRegression(C=0.5, max_iter=1000).fit(h[fit_rows], y[fit_rows],
                                                       sample_weight=balance_weights(source[fit_rows], y[fit_rows]))
    np.testing.assert_allclose(head.decision_function(x), clf.decision_function(h), rtol=1e-5, atol=1e-5)


def test_inlp_projection_removes_the_source_direction() -> None:
    x, y, source, _ = _data()
    z = (x - x.mean(0)) / x.std(0)
    P = inlp_projection(z, source, y, 3)
    np.testing.assert_allclose(P @ P, P, atol=1e-8)  # a projection
    moved = z @ P
    gap = lambda a: abs(a[source == "A", 1].mean() - a[source == "B", 1].mean())
    assert gap(moved) < 0.2 * gap(z)
    # The disease direction survives.
    assert abs(moved[y == 1, 0].mean() - moved[y == 0, 0].mean()) > 0.5 * abs(z[y == 1, 0].mean() - z[y == 0, 0].mean())


def test_head_errors() -> None:
    x, y, source, both = _data()
    with pytest.raises(NotFittedError, match="not fitted"):
        LinearHead().decision_function(x)
    with pytest.raises(ConfigError, match="rows must be"):
        LinearHead(rows="some").fit(x, y, source, both)
    with pytest.raises(ConfigError, match="lengths differ"):
        LinearHead().fit(x, y[:-1], source, both)
    with pytest.raises(ConfigError, match="one class only"):
        LinearHead(rows="two_label").fit(x, y, source, both & (y == 1))
    head = LinearHead(pca=5).fit(x, y, source, both)
    with pytest.raises(ConfigError, match=r"shape \(N, 40\)"):
        head.decision_function(x[:, :3])


def test_oof_margins_score_every_row_with_a_head_that_never_saw_it() -> None:
    x, y, source, both = _data()
    folds = np.arange(len(y)) % 4
    m = oof_margins(lambda: HeadEnsemble([LinearHead(pca=8), LinearHead(pca=8, rows="two_label")]), x, y, source,
                    both, folds)
    assert np.isfinite(m).all()
    # A row's margin changes when its own fold is trained on: proof it was held out.
    leak = LinearHead(pca=8).fit(x, y, source, both).decision_function(x)
    assert not np.allclose(m, leak)


def test_inlp_lowers_the_source_probe_on_a_cohort_with_a_planted_site_marker(tmp_path: Path) -> None:
    """The debiasing step of the shipped recipe removes what tells the sites apart (issue 20, point 5)."""
    from covidcxr.data import crossval_folds, read_manifest
    from covidcxr.data.synth import make_cohort
    from covidcxr.evaluation.probe import source_probe
    from covidcxr.io.image import load_image
    from covidcxr.transforms.resize import resize_image

    manifest = make_cohort(tmp_path / "c", n_patients=90, seed=3, size=96, dicom_fraction=0.0, plant_marker=1.0)
    df = read_manifest(manifest).reset_index(drop=True)
    # Embedding: a 16 x 16 thumbnail of each image (the marker is a bright corner block, plainly visible there).
    x = np.stack([np.asarray(resize_image(load_image(p)[0], 16)).ravel() for p in df["image"]])
    y = (df["label"] == "covid").to_numpy().astype(int)
    source = df["source"].astype(str).to_numpy()
    both = np.ones(len(df), bool)
    groups = df["patient_id"].astype(str).to_numpy()
    folds = crossval_folds(df, 3, stratify_cols=("label",), seed=0)

    def held_out_probe(inlp: int) -> float:
        aucs = []
        for f in range(3):
            te, tr = folds == f, folds != f
            head = LinearHead(pca=32, inlp=inlp).fit(x[tr], y[tr], source[tr], both[tr])
            got = source_probe(head.transform(x[te]), source[te], groups[te], blocks=y[te])
            aucs.append(got["roc_auc"])
        return float(np.mean(aucs))

    before, after = held_out_probe(0), held_out_probe(8)
    assert before > 0.8, (before, after)  # the marker gives the site away
    assert after < before - 0.2, (before, after)
