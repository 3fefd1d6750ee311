"""Temperature scaling (Guo et al. 2017) of a binary classifier's probabilities.

One scalar ``T > 0`` divides the logits, ``p_T = sigmoid(logit(p) / T)``: it changes how
confident the probabilities are, never their order (AUC unchanged). ``T`` is fitted by
minimising the binary cross-entropy on a validation set (the inner-validation split) and
applied to held-out probabilities. Host-side NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize
from scipy.special import expit, logit

PROB_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before taking logits
LOG_T_BOUNDS = (-5.0, 5.0)  # T searched in [e^-5, e^5]


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


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N,) probabilities rescaled by ``temperature``: ``sigmoid(logit(p) / T)``."""
    return expit(logits_from_probs(probs) / temperature)


__all__ = ["apply_temperature", "fit_temperature", "logits_from_probs"]
