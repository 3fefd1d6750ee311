"""An interpretable AVM classifier: L2-penalised logistic regression on lesion descriptors.

Features are named descriptors (:mod:`mlssp_jax.descriptors`), standardised with the
training set's mean and standard deviation; a missing value (``None``/NaN, e.g. a rim
outside the scan) becomes the training mean (0 after standardisation). The fit minimises

    sum_i BCE(y_i, sigmoid(b + z_i . w)) + l2_penalty / 2 * |w|^2

over the standardised features ``z_i`` (the intercept ``b`` unpenalised; scikit-learn's
``LogisticRegression(C=1 / l2_penalty)``) with :func:`optax.lbfgs` in one jitted JAX
``while_loop``, in float32 (JAX's default precision), until the gradient's norm is at most
``tol`` per subject: a handful of features, tens to hundreds of subjects, converged in
~10-20 steps, coefficients within ~1e-6 of the float64 optimum. The rows are padded with
zero-weight rows to a power of two, so the folds of a cross-validation share one compiled
program. The coefficients are per standard deviation of each feature, so their sizes
compare. Saved and loaded as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.special import expit

from mlssp_jax.fileio import write_json

# Size, position and shape, then density relative to the scan's own parenchyma over soft
# tissue only (:mod:`mlssp_jax.descriptors`): the absolute-HU means and spreads (hu_mean,
# hu_std, rim_hu_mean, vessel_fraction) moved with the predicted mask's edge (bone and
# partial volume) and with the scanner (calibration, noise), and fitted on true masks they
# misjudged predicted ones.
DEFAULT_FEATURES = ("log_volume_ml", "centroid_depth_mm", "solidity", "hu_contrast",
                    "core_texture_hu", "rim_contrast", "vessel_contrast_fraction")


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


# Fewest rows of the padded problem: shapes are powers of two from here, one program each.
_MIN_PADDED_ROWS = 16


def _objective(theta: jax.Array, a: jax.Array, y: jax.Array, weight: jax.Array,
               l2_penalty: jax.Array) -> jax.Array:
    """The penalised negative log-likelihood of ``theta`` (F + 1,) = (intercept, coef), for
    ``a`` (N, F + 1) = [1, z], labels ``y`` (N,) and row weights (N,), 1 (subject) or 0 (pad)."""
    nll = jnp.sum(weight * optax.sigmoid_binary_cross_entropy(a @ theta, y))
    return nll + 0.5 * l2_penalty * jnp.sum(theta[1:] ** 2)


@jax.jit
def _lbfgs(a: jax.Array, y: jax.Array, weight: jax.Array, l2_penalty: jax.Array,
           grad_tol: jax.Array, max_iter: jax.Array) -> jax.Array:
    """(F + 1,) minimiser of :func:`_objective` from 0: L-BFGS steps until the gradient's
    L2 norm is at most ``grad_tol`` (or NaN) or after ``max_iter`` steps."""
    def fun(theta):
        return _objective(theta, a, y, weight, l2_penalty)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = solver.update(grad, state, theta, value=value, grad=grad,
                                       value_fn=fun)
        return optax.apply_updates(theta, updates), state

    def running(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm > grad_tol))

    theta = jnp.zeros(a.shape[1], a.dtype)
    theta, _ = jax.lax.while_loop(running, step, (theta, solver.init(theta)))
    return theta


def _minimise(z: np.ndarray, y: np.ndarray, l2_penalty: float, max_iter: int,
              tol: float) -> np.ndarray:
    """Fit on standardised ``z`` (N, F), padded to a power of two of rows (weight 0, which
    leaves the objective unchanged): returns (F + 1,) float64 = (intercept, coef)."""
    n = len(z)
    rows = max(_MIN_PADDED_ROWS, 1 << max(n - 1, 0).bit_length())
    a = np.zeros((rows, z.shape[1] + 1), np.float32)  # (rows, F + 1)
    a[:n, 0], a[:n, 1:] = 1.0, z
    labels, weight = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    labels[:n], weight[:n] = y, 1.0
    theta = _lbfgs(a, labels, weight, np.float32(l2_penalty), np.float32(tol * n),
                   np.int32(max_iter))
    return np.asarray(theta, dtype=float)


def fit(x: np.ndarray, y: np.ndarray, l2_penalty: float,
        features: Sequence[str] = DEFAULT_FEATURES, max_iter: int = 100,
        tol: float = 1e-7) -> DescriptorClassifier:
    """Fit on (N, F) raw features ``x`` (NaN = missing) and (N,) labels in {0, 1}.

    A feature constant on the training set gets scale 1 (its standardised value is 0).
    L-BFGS stops once the objective's gradient norm is at most ``tol * N`` (1e-7 per
    subject is about float32's resolution) or after ``max_iter`` steps.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(features):
        raise ValueError(f"x {x.shape} must be (N, {len(features)}) with N = len(y) {len(y)}")
    mean = np.nanmean(np.where(np.isnan(x).all(axis=0), 0.0, x), axis=0)
    scale = np.nanstd(np.where(np.isnan(x).all(axis=0), 0.0, x), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    model = DescriptorClassifier(tuple(features), mean, scale, np.zeros(len(features)), 0.0,
                                 l2_penalty)
    theta = _minimise(model.standardise(x), y, l2_penalty, max_iter, tol)
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
