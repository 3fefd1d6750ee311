"""The descriptor logistic regression against scikit-learn, its JSON round trip, missing values
and cross-validated probabilities."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_matches_sklearn(l2):
    x, y = _data()
    model = fit(x, y, l2, FEATURES)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    ref = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(model.coef, ref.coef_[0], rtol=1e-5, atol=1e-6)
    assert model.intercept == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(model.predict_proba(x), ref.predict_proba(z)[:, 1], atol=1e-6)


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
