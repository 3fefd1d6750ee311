"""Temperature and Platt scaling recover a known mis-calibration and keep the ranking; a fold's
calibration round-trips through its file; the reliability figure is written."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from mlssp_jax.calibration import (
    Calibration,
    fit,
    fit_platt,
    fit_temperature,
    load,
    logits_from_probs,
)
from mlssp_jax.calibration_figures import figure_reliability
from mlssp_jax.errors import InputError
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
    scaled = Calibration("temperature", 1.0 / t).apply(probs)
    assert expected_calibration_error(labels, scaled) < 0.5 * expected_calibration_error(
        labels, probs)
    assert roc_auc(labels, scaled) == pytest.approx(roc_auc(labels, probs))
    np.testing.assert_allclose(Calibration("temperature", 1.0).apply(probs),
                               np.clip(probs, 1e-6, 1 - 1e-6))


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


def _biased(n: int = 400, seed: int = 1):
    """Labels calibrated at logit z, and a model's logits squeezed into 0.05 * z + 0.4: the
    ranking is right, but every probability sits just above 0.5 (all answered 'AVM')."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < expit(z)).astype(int)
    return labels, 0.05 * z + 0.4


def test_platt_scaling_undoes_a_squeezed_and_shifted_logit():
    labels, logits = _biased()
    slope, intercept = fit_platt(labels, logits)
    assert slope == pytest.approx(20.0, rel=0.25)  # the inverse of the 0.05 squeeze
    assert intercept == pytest.approx(-8.0, rel=0.25)  # and of the +0.4 shift
    cal = fit("platt", labels, expit(logits))
    before, after = expit(logits), cal.apply(expit(logits))
    assert ((before > 0.5) == (labels == 1)).mean() < 0.6  # nearly all "AVM"
    oracle = ((logits > 0.4) == (labels == 1)).mean()  # the threshold at the true logit 0
    assert ((after > 0.5) == (labels == 1)).mean() >= oracle - 0.02
    assert roc_auc(labels, after) == pytest.approx(roc_auc(labels, before))
    assert expected_calibration_error(labels, after) < expected_calibration_error(labels, before)


def test_temperature_cannot_move_the_threshold_but_platt_can():
    """All logits > 0: a temperature keeps every answer 'AVM'; Platt's intercept does not."""
    labels, logits = _biased()
    probs = expit(logits)
    assert (fit("temperature", labels, probs).apply(probs) > 0.5).all()
    assert (fit("platt", labels, probs).apply(probs) < 0.5).sum() > 100


def test_platt_slope_stays_bounded_on_a_separable_handful():
    """Eight subjects perfectly separated: unpenalised, the slope would grow without bound."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    logits = np.array([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4])
    slope, intercept = fit_platt(labels, logits)
    assert 0 < slope < 100 and np.isfinite(intercept)
    assert fit_platt(np.ones(4), np.arange(4.0)) == (1.0, 0.0)  # one class: identity


def test_calibration_round_trips_and_a_bad_file_is_an_input_error(tmp_path):
    assert load(tmp_path) == Calibration()  # no file: the identity
    cal = Calibration("platt", 12.5, -3.0, 8)
    cal.save(tmp_path)
    assert load(tmp_path) == cal
    probs = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(Calibration().apply(probs), probs)
    for text in ("{", '{"method": "platt"}', '{"method": "magic", "slope": 1, "intercept": 0, '
                 '"n": 1}', '{"method": "platt", "slope": NaN, "intercept": 0, "n": 1}'):
        (tmp_path / "calibration.json").write_text(text)
        with pytest.raises(InputError, match="not a calibration file"):
            load(tmp_path)
