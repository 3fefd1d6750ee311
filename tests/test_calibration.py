"""Temperature scaling recovers a known over-confidence and keeps the ranking; the reliability
figure is written."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from mlssp_jax.calibration import apply_temperature, fit_temperature, logits_from_probs
from mlssp_jax.calibration_figures import figure_reliability
from mlssp_jax.metrics import expected_calibration_error, roc_auc


def _overconfident(n: int = 4000, factor: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < expit(z)).astype(int)  # calibrated at logit z
    return labels, factor * z  # the model's logits are `factor` times too large


def test_fit_temperature_recovers_the_overconfidence():
    labels, logits = _overconfident(factor=3.0)
    assert fit_temperature(labels, logits) == pytest.approx(3.0, rel=0.15)
    labels, logits = _overconfident(factor=0.5, seed=1)
    assert fit_temperature(labels, logits) == pytest.approx(0.5, rel=0.15)


def test_applied_temperature_calibrates_without_reordering():
    labels, logits = _overconfident()
    probs = expit(logits)
    t = fit_temperature(labels, logits)
    scaled = apply_temperature(probs, t)
    assert expected_calibration_error(labels, scaled) < 0.5 * expected_calibration_error(
        labels, probs)
    assert roc_auc(labels, scaled) == pytest.approx(roc_auc(labels, probs))
    np.testing.assert_allclose(apply_temperature(probs, 1.0), np.clip(probs, 1e-6, 1 - 1e-6))


def test_one_class_gives_no_change():
    assert fit_temperature(np.ones(5), np.linspace(-1, 1, 5)) == 1.0
    assert np.isfinite(logits_from_probs(np.array([0.0, 1.0]))).all()


def test_reliability_figure_is_written(tmp_path):
    labels, logits = _overconfident(200)
    path = tmp_path / "reliability.png"
    assert figure_reliability({"CNN": (labels, expit(logits))}, path, n_bins=5)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert not figure_reliability({}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
