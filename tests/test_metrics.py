"""Metrics against scikit-learn / scipy / brute force, with the empty-mask rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist
from sklearn import metrics as skm

from mlssp_jax import metrics

RNG = np.random.default_rng(0)


def _cube(lo, hi, shape=(16, 16, 16)):
    mask = np.zeros(shape, bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


# ---------- segmentation ----------

@pytest.mark.parametrize("case", ["random", "all_zero_pred", "all_zero_truth", "perfect"])
def test_confusion_counts_match_sklearn(case):
    truth = RNG.random((8, 8, 8)) < 0.3
    pred = {"random": RNG.random((8, 8, 8)) < 0.3, "all_zero_pred": np.zeros_like(truth),
            "all_zero_truth": truth, "perfect": truth}[case]
    if case == "all_zero_truth":
        truth = np.zeros_like(truth)
    c = metrics.confusion_counts(pred, truth)
    tn, fp, fn, tp = skm.confusion_matrix(truth.ravel(), pred.ravel(), labels=[0, 1]).ravel()
    assert (c.tp, c.fp, c.fn, c.tn) == (tp, fp, fn, tn)
    m = metrics.segmentation_metrics(pred, truth)
    if case == "random":
        assert m["dsc"] == pytest.approx(skm.f1_score(truth.ravel(), pred.ravel()))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(truth.ravel(), pred.ravel()))
        assert m["ppv"] == pytest.approx(skm.precision_score(truth.ravel(), pred.ravel()))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))


def test_segmentation_hand_computed_with_spacing():
    truth = _cube((2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = _cube((2, 2, 2), (6, 6, 8))  # 96 voxels, 64 overlap
    m = metrics.segmentation_metrics(pred, truth, spacing_mm=(1.0, 1.0, 2.0))
    assert m["dsc"] == pytest.approx(2 * 64 / (64 + 96))
    assert m["sensitivity"] == 1.0
    assert m["ppv"] == pytest.approx(64 / 96)
    assert m["specificity"] == pytest.approx((4096 - 96) / (4096 - 64))
    assert m["volume_error_ml"] == pytest.approx(32 * 2.0 / 1000)


def test_empty_mask_rules():
    empty, lesion = np.zeros((8, 8, 8), bool), _cube((2, 2, 2), (4, 4, 4), (8, 8, 8))
    both = metrics.segmentation_metrics(empty, empty)
    assert both["dsc"] == 1.0 and both["hd95_mm"] == 0.0 and both["volume_error_ml"] == 0.0
    assert np.isnan(both["sensitivity"]) and np.isnan(both["ppv"])
    assert both["specificity"] == 1.0
    missed = metrics.segmentation_metrics(empty, lesion)
    assert missed["dsc"] == 0.0 and missed["sensitivity"] == 0.0 and np.isnan(missed["ppv"])
    assert missed["hd95_mm"] == np.inf and missed["volume_error_ml"] == pytest.approx(0.008)
    false_alarm = metrics.segmentation_metrics(lesion, empty)
    assert false_alarm["dsc"] == 0.0 and np.isnan(false_alarm["sensitivity"])
    assert false_alarm["ppv"] == 0.0 and false_alarm["hd95_mm"] == np.inf


def test_hd95_hand_computed():
    a, b = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    a[2, 2, 2], b[2, 5, 6] = True, True  # single voxels 3 and 4 voxels apart
    assert metrics.hd95_mm(a, b) == pytest.approx(5.0)
    assert metrics.hd95_mm(a, b, spacing_mm=(1.0, 2.0, 0.5)) == pytest.approx(np.hypot(6, 2))
    assert metrics.hd95_mm(a, a) == 0.0


def _brute_hd95(a, b, spacing):
    """Reference: surfaces by erosion, all pairwise distances by cdist."""
    def points(mask):
        return np.argwhere(metrics._surface(mask)) * np.asarray(spacing)
    d = cdist(points(a), points(b))
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def test_hd95_matches_brute_force():
    a = _cube((2, 3, 4), (9, 10, 8))
    b = _cube((4, 2, 3), (12, 8, 11)) | _cube((12, 12, 12), (15, 15, 15))
    spacing = (0.8, 1.0, 1.5)
    assert metrics.hd95_mm(a, b, spacing) == pytest.approx(_brute_hd95(a, b, spacing))


def test_mean_metrics_skips_nan_keeps_inf():
    rows = [{"dsc": 0.5, "ppv": np.nan, "hd95_mm": 2.0},
            {"dsc": 1.0, "ppv": 0.4, "hd95_mm": np.inf}]
    assert metrics.mean_metrics(rows) == {"dsc": 0.75, "ppv": 0.4, "hd95_mm": np.inf}


# ---------- classification ----------

LABEL_CASES = {
    "random": (RNG.integers(0, 2, 40), RNG.random(40)),
    "ties": (RNG.integers(0, 2, 40), RNG.integers(0, 4, 40) / 4),
    "perfect": (np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.7, 0.8, 0.9])),
    "all_zero_scores": (np.array([0, 1, 0, 1]), np.zeros(4)),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_auc_and_roc_match_sklearn(case):
    labels, scores = LABEL_CASES[case]
    assert metrics.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    ours = metrics.roc_curve(labels, scores)
    ref = skm.roc_curve(labels, scores, drop_intermediate=False)
    for got, want in zip(ours, ref, strict=True):
        np.testing.assert_allclose(got, want)


def test_auc_single_class_is_nan():
    assert np.isnan(metrics.roc_auc(np.ones(4), RNG.random(4)))
    m = metrics.classification_metrics(np.zeros(4), np.array([0.1, 0.6, 0.2, 0.3]))
    assert np.isnan(m["sensitivity"]) and np.isnan(m["auc"])
    assert m["specificity"] == 0.75 and m["accuracy"] == 0.75


def test_classification_metrics_match_sklearn():
    labels, probs = LABEL_CASES["random"]
    m = metrics.classification_metrics(labels, probs, threshold=0.4)
    pred = probs >= 0.4
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    # the threshold is inclusive: prob == threshold is positive
    assert metrics.classification_metrics([1], [0.5])["sensitivity"] == 1.0


# ---------- statistics ----------

def test_bootstrap_ci_seeded_and_close_to_scipy():
    values = RNG.normal(0.8, 0.1, 30)
    est, low, high = metrics.bootstrap_ci(np.mean, values, n_resamples=4000, seed=1)
    assert (est, low, high) == metrics.bootstrap_ci(np.mean, values, n_resamples=4000, seed=1)
    assert metrics.bootstrap_ci(np.mean, values, n_resamples=4000, seed=2) != (est, low, high)
    ref = stats.bootstrap((values,), np.mean, n_resamples=4000, method="percentile",
                          rng=np.random.default_rng(5)).confidence_interval
    width = ref.high - ref.low
    assert est == pytest.approx(values.mean())
    assert low == pytest.approx(ref.low, abs=0.05 * width)
    assert high == pytest.approx(ref.high, abs=0.05 * width)


def test_bootstrap_ci_over_pairs_skips_one_class_resamples():
    labels, probs = np.array([0, 1, 0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.6, 0.3, 0.1])
    est, low, high = metrics.bootstrap_ci(metrics.roc_auc, labels, probs, n_resamples=500)
    assert est == pytest.approx(skm.roc_auc_score(labels, probs))
    assert 0.0 <= low <= est <= high <= 1.0
    est, low, high = metrics.bootstrap_ci(metrics.roc_auc, np.ones(3), np.ones(3), n_resamples=9)
    assert np.isnan(est) and np.isnan(low) and np.isnan(high)


def _naive_delong(labels, a, b):
    """Reference DeLong (1988) with the O(m n) kernel psi = 1 / 0.5 / 0."""
    labels = np.asarray(labels).astype(bool)
    v10, v01, aucs = [], [], []
    for s in (a, b):
        x, y = s[labels][:, None], s[~labels][None, :]
        psi = (x > y) + 0.5 * (x == y)
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    cov = np.cov(v10) / labels.sum() + np.cov(v01) / (~labels).sum()
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return aucs[0], aucs[1], 2 * stats.norm.sf(abs(z))


def test_delong_hand_checked():
    # positives (0.9, 0.6) / (0.8, 0.6), negatives (0.7, 0.2) / (0.5, 0.1): AUC 0.75 and 1.
    # Model a's components: V10 = (1, 0.5), V01 = (0.5, 1), each variance 0.125, so
    # var = 0.125/2 + 0.125/2 = 0.125 (model b has none); z = 0.25 / sqrt(0.125).
    labels = np.array([1, 1, 0, 0])
    auc_a, auc_b, p = metrics.delong_test(labels, np.array([0.9, 0.6, 0.7, 0.2]),
                                          np.array([0.8, 0.6, 0.5, 0.1]))
    assert (auc_a, auc_b) == (0.75, 1.0)
    assert p == pytest.approx(2 * stats.norm.sf(0.25 / np.sqrt(0.125)))  # 0.4795
    assert p == pytest.approx(0.4795, abs=1e-4)


@pytest.mark.parametrize("case", ["random", "ties"])
def test_delong_matches_naive(case):
    labels, a = LABEL_CASES[case]
    b = np.clip(a + RNG.normal(0, 0.3, a.size), 0, 1)
    if case == "ties":
        b = np.round(b * 3) / 3
    np.testing.assert_allclose(metrics.delong_test(labels, a, b), _naive_delong(labels, a, b))
    assert metrics.delong_test(labels, a, a)[2] == 1.0


def test_brier_and_ece_hand_computed():
    labels, probs = np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.9])
    assert metrics.brier_score(labels, probs) == pytest.approx((0.01 + 0.09 + 0.16 + 0.01) / 4)
    # 2 bins: [0, .5) mean .2 freq 0, [.5, 1] mean .75 freq 1 -> (0.2 + 0.25) / 2
    assert metrics.expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(0.225)
    bins = metrics.reliability_bins(labels, probs, n_bins=4)
    np.testing.assert_array_equal(bins["count"], [1, 1, 1, 1])
    np.testing.assert_allclose(bins["mean_prob"], probs)
    np.testing.assert_allclose(bins["frequency"], labels)
    np.testing.assert_allclose(bins["lower"], [0, 0.25, 0.5, 0.75])


def test_ece_if_calibrated_tells_sampling_noise_from_miscalibration():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.05, 0.95, 40)
    calibrated = (rng.random(40) < probs).astype(int)  # labels drawn from the probabilities
    reference = metrics.ece_if_calibrated(calibrated, probs, 10, n_resamples=500, seed=1)
    # 40 subjects: a calibrated model's ECE is far from 0 by sampling alone
    assert 0.08 < reference["median"] < 0.25
    low, high = reference["range95"]
    assert low < reference["median"] < high and reference["p"] > 0.05
    # the same probabilities with labels that ignore them: miscalibrated beyond chance
    wrong = (probs < 0.5).astype(int)
    assert metrics.ece_if_calibrated(wrong, probs, 10, n_resamples=500, seed=1)["p"] < 0.01
    # seeded; the reference depends on the probabilities only, not on the labels
    again = metrics.ece_if_calibrated(wrong, probs, 10, n_resamples=500, seed=1)
    assert again["median"] == reference["median"] and again["range95"] == reference["range95"]
    assert metrics.ece_if_calibrated(np.array([]), np.array([]))["median"] is None


def test_reliability_bin_edges_and_empty_bins():
    bins = metrics.reliability_bins(np.array([1, 0, 1]), np.array([1.0, 0.5, 0.0]), n_bins=2)
    np.testing.assert_array_equal(bins["count"], [1, 2])  # 0.5 and 1.0 are in the last bin
    empty = metrics.reliability_bins(np.array([1, 1]), np.array([0.95, 0.97]), n_bins=10)
    assert np.isnan(empty["mean_prob"][:9]).all() and empty["count"][9] == 2
    # perfectly calibrated groups: ECE 0; all wrong and certain: ECE 1
    assert metrics.expected_calibration_error(np.array([0, 1, 0, 1]), np.full(4, 0.5), 10) == 0.0
    assert metrics.expected_calibration_error(np.array([0, 1]), np.array([1.0, 0.0]), 10) == 1.0
    with pytest.raises(ValueError, match="n_bins"):
        metrics.reliability_bins(np.array([1]), np.array([0.5]), n_bins=0)
