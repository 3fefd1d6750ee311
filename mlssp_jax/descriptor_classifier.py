"""An interpretable AVM classifier: L2-penalised logistic regression on lesion descriptors.

Features are named descriptors (:mod:`mlssp_jax.descriptors`), standardised with the
training set's mean and standard deviation; a missing value (``None``/NaN, e.g. a rim
outside the scan) becomes the training mean (0 after standardisation). The fit minimises

    sum_i BCE(y_i, sigmoid(b + x_i . w)) + l2_penalty / 2 * |w|^2

(the intercept ``b`` unpenalised; scikit-learn's ``LogisticRegression(C=1 / l2_penalty)``)
by Newton's method (IRLS) in NumPy: a handful of features, tens to hundreds of subjects,
converged in ~10 steps. The coefficients are per standard deviation of each feature, so
their sizes compare. Saved and loaded as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from mlssp_jax.fileio import write_json

# The six of issue 16 plus the surface irregularity.
DEFAULT_FEATURES = ("log_volume_ml", "hu_mean", "hu_std", "centroid_depth_mm",
                    "vessel_fraction", "rim_hu_mean", "solidity")


@dataclass(frozen=True)
class DescriptorClassifier:
    """A fitted model: ``p = sigmoid(intercept + ((x - mean) / scale) . coef)``; arrays (F,)."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    l2_penalty: float

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> standardised, NaN -> 0 (the training mean)."""
        z = (np.asarray(x, float) - self.mean) / self.scale
        return np.where(np.isnan(z), 0.0, z)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> (N,) logits."""
        return self.intercept + self.standardise(x) @ self.coef

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> (N,) probabilities of AVM."""
        return expit(self.decision_function(x))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "l2_penalty": self.l2_penalty}

    @classmethod
    def from_dict(cls, d: Mapping) -> DescriptorClassifier:
        return cls(tuple(d["features"]), np.asarray(d["mean"], float),
                   np.asarray(d["scale"], float), np.asarray(d["coef"], float),
                   float(d["intercept"]), float(d["l2_penalty"]))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DescriptorClassifier:
        return cls.from_dict(json.loads(Path(path).read_text()))


def design_matrix(rows: Sequence[Mapping[str, float | None]],
                  features: Sequence[str] = DEFAULT_FEATURES) -> np.ndarray:
    """(N, F) float array of the named descriptors of each row; None -> NaN."""
    return np.array([[np.nan if r.get(f) is None else float(r[f]) for f in features]
                     for r in rows], dtype=float).reshape(len(rows), len(features))


def _newton(z: np.ndarray, y: np.ndarray, l2_penalty: float, max_iter: int,
            tol: float) -> np.ndarray:
    """Penalised IRLS on standardised ``z`` (N, F): returns (F + 1,) = (intercept, coef)."""
    a = np.column_stack([np.ones(len(z)), z])  # (N, F + 1)
    penalty = np.full(a.shape[1], l2_penalty)
    penalty[0] = 0.0
    theta = np.zeros(a.shape[1])
    for _ in range(max_iter):
        p = expit(a @ theta)
        grad = a.T @ (p - y) + penalty * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty)
        step = np.linalg.solve(hess + 1e-10 * np.eye(len(theta)), grad)
        theta -= step
        if np.max(np.abs(step)) < tol:
            break
    return theta


def fit(x: np.ndarray, y: np.ndarray, l2_penalty: float,
        features: Sequence[str] = DEFAULT_FEATURES, max_iter: int = 100,
        tol: float = 1e-10) -> DescriptorClassifier:
    """Fit on (N, F) raw features ``x`` (NaN = missing) and (N,) labels in {0, 1}.

    A feature constant on the training set gets scale 1 (its standardised value is 0).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(features):
        raise ValueError(f"x {x.shape} must be (N, {len(features)}) with N = len(y) {len(y)}")
    mean = np.nanmean(np.where(np.isnan(x).all(axis=0), 0.0, x), axis=0)
    scale = np.nanstd(np.where(np.isnan(x).all(axis=0), 0.0, x), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    model = DescriptorClassifier(tuple(features), mean, scale, np.zeros(len(features)), 0.0,
                                 l2_penalty)
    theta = _newton(model.standardise(x), y, l2_penalty, max_iter, tol)
    return DescriptorClassifier(tuple(features), mean, scale, theta[1:], float(theta[0]),
                                l2_penalty)


def lesion_probabilities(models: Sequence[DescriptorClassifier],
                         rows: Sequence[Mapping[str, float | None]]) -> list[float | None]:
    """The mean over ``models`` (a fold ensemble) of each descriptor row's AVM probability;
    None for a row without a lesion (``volume_ml`` 0 or None) or when ``models`` is empty."""
    if not models or not rows:
        return [None] * len(rows)
    probs = np.mean([m.predict_proba(design_matrix(rows, m.features)) for m in models], axis=0)
    return [float(p) if r.get("volume_ml") else None for p, r in zip(probs, rows, strict=True)]


def cross_validated_probs(x: np.ndarray, y: np.ndarray, test_folds: Sequence[np.ndarray],
                          l2_penalty: float,
                          features: Sequence[str] = DEFAULT_FEATURES) -> np.ndarray:
    """(N,) out-of-fold probabilities: each index array of ``test_folds`` predicted by a model
    fitted on all the other subjects (standardisation included)."""
    probs = np.full(len(y), np.nan)
    for test in test_folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        probs[test] = fit(x[train], y[train], l2_penalty, features).predict_proba(x[test])
    return probs


__all__ = ["DEFAULT_FEATURES", "DescriptorClassifier", "cross_validated_probs", "design_matrix",
           "fit", "lesion_probabilities"]
