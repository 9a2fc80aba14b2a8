"""Linear heads on frozen embeddings, with the source information projected out (no torch).

A head is cheap to fit, so many can be compared out of fold (``benchmarks/shortcut.py``) before anything is
fine-tuned, and the shipped classifier is one (an ImageNet EfficientNet-Lite0 whose features stay frozen). A
:class:`LinearHead` standardises the embedding, reduces it by PCA, optionally removes the directions that tell the
archive apart (:func:`inlp_projection`) and fits a logistic regression. Every step is linear, so the fitted head
collapses into one weight vector and bias on the raw embedding (:meth:`LinearHead.coef`), which is what the
network's ``nn.Linear`` head holds: inference needs nothing but the network.

Iterative nullspace projection (Ravfogel et al., ACL 2020) repeatedly fits linear classifiers of the *source*
within each label and projects their directions away. Within a label, what still tells the sources apart is the
archive (scanner, processing, burned-in marks), not the disease. ``matched=True`` restricts those classifiers to
images whose pathology matches across sources (COVID-19 images of every source; the negatives of single-label
sources, i.e. normals), because in public data the negatives of a two-label source are often other pneumonias:
"which source" among negatives would then also be "pneumonia or normal".
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, NotFittedError

log = logging.getLogger(__name__)


def _source_directions(x: np.ndarray, source: np.ndarray, label: np.ndarray, C: float,
                       use: np.ndarray | None) -> np.ndarray:
    """Unit directions of linear source classifiers fitted within each label that holds >= 2 sources."""
    from sklearn.linear_model import LogisticRegression

    dirs = []
    for lab in np.unique(label):
        sel = label == lab
        if use is not None:
            sel &= use
        if np.unique(source[sel]).size < 2:
            continue
        clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(x[sel], source[sel])
        dirs.append(clf.coef_)
    if not dirs:
        return np.zeros((0, x.shape[1]))
    w = np.concatenate(dirs)
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    keep = norm[:, 0] > 1e-8  # a classifier left with nothing to separate has zero weights
    return w[keep] / norm[keep]


def inlp_projection(x: np.ndarray, source: np.ndarray, label: np.ndarray, n_iter: int, *, C: float = 0.1,
                    use: np.ndarray | None = None) -> np.ndarray:
    """Projection matrix ``P`` (``D x D``, applied as ``x @ P``) removing label-conditional source directions.

    Args:
        x: Features ``(N, D)`` (standardised).
        source: Source per row.
        label: Label per row (0/1 or names): source classifiers are fitted within each label.
        n_iter: Rounds; each removes the directions of the classifiers fitted on the features projected so far.
        C: Inverse regularisation of those classifiers.
        use: Optional boolean mask of the rows the source classifiers may see.

    Returns:
        The orthogonal projection onto the complement of every removed direction.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    basis = np.zeros((0, d))
    P = np.eye(d)
    for _ in range(int(n_iter)):
        w = _source_directions(x @ P, np.asarray(source), np.asarray(label), C, use)
        if len(w) == 0:
            break
        basis = np.concatenate([basis, w])
        q, _ = np.linalg.qr(basis.T)
        P = np.eye(d) - q @ q.T
    return P


def balance_weights(source: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample weights giving every source x label cell the same total weight (mean weight 1)."""
    key = np.char.add(np.char.add(np.asarray(source).astype(str), "|"), np.asarray(y).astype(str))
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w * len(w) / w.sum()


class LinearHead:
    """Standardise -> PCA -> (INLP) -> logistic regression, collapsible into one linear map.

    Args:
        C: Inverse L2 regularisation of the logistic regression.
        pca: Components kept (whitened); 0 = none.
        balance: Weight rows so every source x label cell counts the same (else classes are balanced).
        rows: ``all`` or ``two_label`` (fit on rows of sources holding both labels only; the transforms still see
            every row).
        inlp: Rounds of :func:`inlp_projection` (0 = none).
        matched: Pathology-matched source classifiers for INLP (see the module docstring).
        seed: Seed of the PCA solver.
    """

    def __init__(self, C: float = 0.03, pca: int = 128, balance: bool = True, rows: str = "all", inlp: int = 0,
                 matched: bool = False, seed: int = 0) -> None:
        self.C = C
        self.pca = pca
        self.balance = balance
        self.rows = rows
        self.inlp = inlp
        self.matched = matched
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        """The settings (JSON-ready)."""
        return {k: getattr(self, k) for k in ("C", "pca", "balance", "rows", "inlp", "matched", "seed")}

    def fit(self, x: np.ndarray, y: np.ndarray, source: np.ndarray, both: np.ndarray) -> LinearHead:
        """Fit on embeddings ``x`` with labels ``y`` (0/1), ``source`` names and the two-label-source mask ``both``.

        Raises:
            ConfigError: Bad settings, mismatched lengths or a single class among the rows fitted.
        """
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        if self.rows not in ("all", "two_label"):
            raise ConfigError(f"rows must be 'all' or 'two_label', got {self.rows!r}")
        x = np.asarray(x, dtype=np.float64)
        y, source, both = np.asarray(y).astype(int), np.asarray(source).astype(str), np.asarray(both, dtype=bool)
        if not len(x) == len(y) == len(source) == len(both):
            raise ConfigError(f"lengths differ: x {len(x)}, y {len(y)}, source {len(source)}, both {len(both)}")
        mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-8
        A = np.diag(1.0 / sd)  # raw -> standardised: (x - mu) @ A
        z = (x - mu) @ A
        if self.pca and self.pca < z.shape[1]:
            p = PCA(int(self.pca), random_state=self.seed).fit(z)
            comp = p.components_.T
            scores = (z - p.mean_) @ comp
            s = scores.std(axis=0) + 1e-8
            B = comp / s  # standardised -> whitened PCA scores: (z - pca_mean) @ B
            shift = mu + p.mean_ * sd  # z - pca_mean = (x - shift) @ A
            T = A @ B
        else:
            shift, T = mu, A
        h = (x - shift) @ T
        self.shift_, self.transform_ = shift, T
        if self.inlp:
            use = ~((y == 0) & both) if self.matched else None
            T = T @ inlp_projection(h, source, y, self.inlp, use=use)
            h = (x - shift) @ T
            self.transform_ = T
        fit_rows = both if self.rows == "two_label" else np.ones(len(y), bool)
        if np.unique(y[fit_rows]).size < 2:
            raise ConfigError(f"the {int(fit_rows.sum())} rows to fit hold one class only")
        weights = balance_weights(source[fit_rows], y[fit_rows]) if self.balance else None
        clf = LogisticRegression(C=self.C, max_iter=1000, class_weight=None if self.balance else "balanced")
        clf.fit(h[fit_rows], y[fit_rows], sample_weight=weights)
        w = T @ clf.coef_[0]
        self.coef_ = w
        self.intercept_ = float(clf.intercept_[0] - shift @ w)
        self.n_features_in_ = x.shape[1]
        return self

    def _check(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit() first")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ConfigError(f"expected embeddings of shape (N, {self.n_features_in_}), got {x.shape}")
        return x

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logit of P(covid) (``logit_covid - logit_non_covid`` of the collapsed head)."""
        return self._check(x) @ self.coef_ + self.intercept_

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The representation the logistic regression sees (standardised, PCA, source directions removed)."""
        return (self._check(x) - self.shift_) @ self.transform_


class HeadEnsemble:
    """The mean logit of several :class:`LinearHead` s on the same embedding (still one linear map)."""

    def __init__(self, heads: list[LinearHead]) -> None:
        self.heads = heads

    def get_params(self) -> dict[str, Any]:
        return {"heads": [h.get_params() for h in self.heads]}

    def fit(self, x: np.ndarray, y: np.ndarray, source: np.ndarray, both: np.ndarray) -> HeadEnsemble:
        for h in self.heads:
            h.fit(x, y, source, both)
        self.coef_ = np.mean([h.coef_ for h in self.heads], axis=0)
        self.intercept_ = float(np.mean([h.intercept_ for h in self.heads]))
        self.n_features_in_ = self.heads[0].n_features_in_
        return self

    _check = LinearHead._check
    decision_function = LinearHead.decision_function


def oof_margins(head_factory: Any, x: np.ndarray, y: np.ndarray, source: np.ndarray, both: np.ndarray,
                folds: np.ndarray, x_extra: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold logits: for each fold, a fresh head fitted on the other folds scores the held-out rows.

    ``x_extra``: embeddings of altered copies of every row (e.g. re-acquired images); the training folds' copies
    join the fit, the held-out rows are scored as they are.
    """
    out = np.full(len(y), np.nan)
    for f in np.unique(folds[folds >= 0]):
        te, tr = folds == f, folds != f
        if x_extra is None:
            head = head_factory().fit(x[tr], y[tr], source[tr], both[tr])
        else:
            head = head_factory().fit(np.concatenate([x[tr], x_extra[tr]]), np.tile(y[tr], 2),
                                      np.tile(source[tr], 2), np.tile(both[tr], 2))
        out[te] = head.decision_function(x[te])
    return out
