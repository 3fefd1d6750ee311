"""Post-hoc calibration of a binary classifier's probabilities: an affine map of the logit.

``p' = sigmoid(slope * logit(p) + intercept)`` changes how confident the probabilities are
and where 0.5 falls, never their order (AUC unchanged), fitted on a validation set (the
inner-validation split) and applied to held-out probabilities (:class:`Calibration`):

- temperature scaling (Guo et al. 2017): ``slope = 1 / T``, ``intercept = 0``, ``T``
  minimising the mean binary cross-entropy; it cannot move a classifier whose logits all
  sit on one side of 0 (every answer "AVM");
- Platt scaling (Platt 1999): slope and intercept from an L2-penalised logistic regression
  on the standardised logit (``PLATT_L2``, scikit-learn's default ``C = 1``), which bounds
  the slope when a few validation subjects are perfectly separated.

Host-side NumPy/SciPy, and the descriptor classifier's logistic regression for Platt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy.special import expit, logit

from mlssp_jax import descriptor_classifier
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json

PROB_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before taking logits
LOG_T_BOUNDS = (-5.0, 5.0)  # T searched in [e^-5, e^5]
PLATT_L2 = 1.0  # penalty on the standardised slope: sum BCE + PLATT_L2 / 2 * w^2
METHODS = ("none", "temperature", "platt")
FILE_NAME = "calibration.json"  # a fold's calibration, in W/fold_K/


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """(N,) probabilities -> (N,) logits, clipped to +-logit(1 - PROB_EPS)."""
    return logit(np.clip(np.asarray(probs, dtype=float), PROB_EPS, 1.0 - PROB_EPS))


def _nll(log_t: float, logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits / np.exp(log_t)
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # BCE of sigmoid(z)


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature minimising the mean BCE of ``sigmoid(logits / T)``: (N,) labels in
    {0, 1}, (N,) logits. 1.0 (no change) if the labels are of one class only or N = 0."""
    labels, logits = np.asarray(labels, dtype=float), np.asarray(logits, dtype=float)
    if labels.size == 0 or labels.min() == labels.max():
        return 1.0
    result = optimize.minimize_scalar(_nll, bounds=LOG_T_BOUNDS, args=(logits, labels),
                                      method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of Platt scaling on (N,) labels in {0, 1} and (N,) logits: the
    project's L2 logistic regression (:func:`mlssp_jax.descriptor_classifier.fit`) on the
    logit as its one feature, standardised, mapped back to the raw logit. (1, 0) if the
    labels are of one class only or N = 0."""
    labels, logits = np.asarray(labels, dtype=float), np.asarray(logits, dtype=float)
    if labels.size == 0 or labels.min() == labels.max():
        return 1.0, 0.0
    model = descriptor_classifier.fit(logits[:, None], labels, PLATT_L2, features=("logit",))
    slope = float(model.coef[0] / model.scale[0])
    return slope, float(model.intercept - slope * model.mean[0])


@dataclass(frozen=True)
class Calibration:
    """``p' = sigmoid(slope * logit(p) + intercept)``, fitted by ``method`` (:data:`METHODS`)
    on ``n`` validation subjects. The identity is ``Calibration()``."""

    method: str = "none"
    slope: float = 1.0
    intercept: float = 0.0
    n: int = 0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N,) probabilities -> (N,) calibrated probabilities (unchanged by the identity)."""
        if self.method == "none":
            return np.asarray(probs, dtype=float)
        return expit(self.slope * logits_from_probs(probs) + self.intercept)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, fold_dir: Path) -> None:
        """Write ``fold_dir/calibration.json`` atomically."""
        write_json(fold_dir / FILE_NAME, self.to_dict())


def load(fold_dir: Path) -> Calibration:
    """A fold's saved calibration; the identity for a fold without ``calibration.json``."""
    path = Path(fold_dir) / FILE_NAME
    if not path.is_file():
        return Calibration()
    try:
        raw = json.loads(path.read_text())
        cal = Calibration(str(raw["method"]), float(raw["slope"]), float(raw["intercept"]),
                          int(raw["n"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a calibration file: {err}") from None
    if cal.method not in METHODS or not (np.isfinite(cal.slope) and np.isfinite(cal.intercept)):
        raise InputError(f"{path}: not a calibration file: method {cal.method!r}, "
                         f"slope {cal.slope}, intercept {cal.intercept}")
    return cal


def fit(method: str, labels: np.ndarray, probs: np.ndarray) -> Calibration:
    """The calibration ``method`` fitted on (N,) labels and (N,) probabilities."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    n = int(np.asarray(labels).size)
    if method == "none":
        return Calibration(n=n)
    logits = logits_from_probs(probs)
    if method == "temperature":
        return Calibration(method, 1.0 / fit_temperature(labels, logits), 0.0, n)
    slope, intercept = fit_platt(labels, logits)
    return Calibration(method, slope, intercept, n)


__all__ = ["METHODS", "Calibration", "fit", "fit_platt", "fit_temperature", "load",
           "logits_from_probs"]
