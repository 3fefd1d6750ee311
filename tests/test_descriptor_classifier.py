"""The descriptor logistic regression against scikit-learn and SciPy, its optimality and
determinism, its JSON round trip, missing values and cross-validated probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from mlssp_jax.descriptor_classifier import (
    DescriptorClassifier,
    cross_validated_probs,
    design_matrix,
    fit,
)
from mlssp_jax.metrics import roc_auc

FEATURES = ("a", "b", "c")


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, 1.0]  # unlike scales
    logits = 1.5 * (x[:, 0]) - 0.2 * (x[:, 1] - 50) + 0.0 * x[:, 2]
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(float)
    return x, y


def _objective_and_grad(theta, z, y, l2):
    """The fit's objective and its gradient at ``theta`` = (intercept, coef), in float64 NumPy."""
    a = np.column_stack([np.ones(len(z)), z])
    logits = a @ theta
    value = np.sum(np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * theta[1:] @ theta[1:]
    grad = a.T @ (expit(logits) - y)
    grad[1:] += l2 * theta[1:]
    return value, grad


def _theta(model):
    return np.concatenate([[model.intercept], model.coef])


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_matches_sklearn(l2):
    x, y = _data()
    model = fit(x, y, l2, FEATURES)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    ref = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(model.coef, ref.coef_[0], rtol=1e-5, atol=1e-6)
    assert model.intercept == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(model.predict_proba(x), ref.predict_proba(z)[:, 1], atol=1e-6)


@pytest.mark.parametrize("l2", [0.01, 1.0, 10.0])
def test_gradient_vanishes_at_the_fit(l2):
    """float32 rounds theta to ~1e-7 relative, times a Hessian of ~N / 4: a gradient norm of
    a few 1e-6 at N = 120 is the floor (measured <= 6e-6); the start (theta = 0) has ~45."""
    x, y = _data()
    model = fit(x, y, l2, FEATURES)
    _, grad = _objective_and_grad(_theta(model), model.standardise(x), y, l2)
    assert np.linalg.norm(grad) < 5e-7 * len(y)


@pytest.mark.parametrize("l2", [0.01, 1.0])
def test_matches_scipy_lbfgs_in_float64(l2):
    """Within 5e-6 of SciPy's float64 optimum (measured <= 8e-7: float32's resolution)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 3)) * [2.0, 0.5, 30.0] + [1.0, -3.0, 100.0]
    y = (rng.random(120) < expit(x @ (rng.normal(size=3) * [0.5, 2.0, 0.03]) - 3.0)).astype(float)
    model = fit(x, y, l2, FEATURES)
    z = model.standardise(x)
    ref = minimize(_objective_and_grad, np.zeros(4), args=(z, y, l2), jac=True,
                   method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 10_000})
    assert np.linalg.norm(ref.jac) < 1e-6
    np.testing.assert_allclose(_theta(model), ref.x, rtol=0, atol=5e-6)


def test_separable_data_with_a_penalty_has_finite_coefficients():
    """Perfectly separable labels: the unpenalised optimum is at infinity; the penalised one is
    finite, classifies every subject, and |w|^2 <= 2 N log 2 / l2 (the objective at 0)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 3))
    y = (x[:, 0] > 0).astype(float)
    model = fit(x, y, 1.0, FEATURES)
    assert np.isfinite(_theta(model)).all()
    assert model.coef @ model.coef <= 2 * len(y) * np.log(2) / 1.0
    np.testing.assert_array_equal(model.predict_proba(x) > 0.5, y == 1)
    _, grad = _objective_and_grad(_theta(model), model.standardise(x), y, 1.0)
    assert np.linalg.norm(grad) < 5e-7 * len(y)


def test_fit_is_deterministic():
    x, y = _data()
    first, second = fit(x, y, 1.0, FEATURES), fit(x, y, 1.0, FEATURES)
    np.testing.assert_array_equal(_theta(first), _theta(second))


def test_penalty_shrinks_coefficients_and_learns():
    x, y = _data()
    weak, strong = fit(x, y, 0.01, FEATURES), fit(x, y, 100.0, FEATURES)
    assert np.linalg.norm(strong.coef) < 0.5 * np.linalg.norm(weak.coef)
    assert roc_auc(y, weak.predict_proba(x)) > 0.8
    assert abs(weak.coef[0]) > abs(weak.coef[2])  # the informative feature outweighs noise


def test_json_round_trip(tmp_path):
    x, y = _data()
    model = fit(x, y, 1.0, FEATURES)
    model.save(tmp_path / "clf.json")
    loaded = DescriptorClassifier.load(tmp_path / "clf.json")
    assert loaded.features == FEATURES
    np.testing.assert_allclose(loaded.predict_proba(x), model.predict_proba(x))


def test_missing_values_are_the_training_mean():
    x, y = _data()
    model = fit(x, y, 1.0, FEATURES)
    row = x[:1].copy()
    row[0, 1] = np.nan
    at_mean = x[:1].copy()
    at_mean[0, 1] = model.mean[1]
    np.testing.assert_allclose(model.predict_proba(row), model.predict_proba(at_mean))
    rows = [{"a": 1.0, "b": None, "c": 2.0}]
    np.testing.assert_array_equal(np.isnan(design_matrix(rows, FEATURES)), [[False, True, False]])


def test_constant_and_all_missing_features_are_harmless():
    x, y = _data()
    x[:, 2] = 3.0
    model = fit(x, y, 1.0, FEATURES)
    assert model.coef[2] == pytest.approx(0.0, abs=1e-8)
    x[:, 2] = np.nan
    assert np.isfinite(fit(x, y, 1.0, FEATURES).predict_proba(x)).all()


def test_cross_validated_probs_use_only_other_folds():
    x, y = _data(60)
    folds = np.array_split(np.arange(60), 3)
    probs = cross_validated_probs(x, y, folds, 1.0, FEATURES)
    rest = np.arange(20, 60)
    np.testing.assert_allclose(probs[:20], fit(x[rest], y[rest], 1.0, FEATURES)
                               .predict_proba(x[:20]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="must be"):
        fit(np.zeros((4, 2)), np.zeros(4), 1.0, FEATURES)
