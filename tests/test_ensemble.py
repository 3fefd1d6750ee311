"""The fold ensemble: its device-side mean equals the per-fold predictions' mean, on-device
TTA equals the host's, and windows larger than the training VOI stay close to it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax import calibration, checkpointing, config, ensemble, inference, models, train_lib


def tiny_config():
    return config.apply_overrides(config.Config(), ["data.voi_size=16", "model.width=4",
                                                    "model.dense_units=8"])


@pytest.fixture(scope="module")
def two_folds():
    cfg = tiny_config()
    net = models.build_model(cfg.model)
    return cfg, [models.init_params(net, 16, seed) for seed in (0, 1)]


def test_ensemble_equals_the_mean_of_per_fold_predictions(two_folds):
    cfg, params = two_folds
    images = np.random.default_rng(0).random((2, 16, 16, 16, 1), dtype=np.float32)
    per_fold = [train_lib.make_predict_fn(cfg)(p, images) for p in params]
    model = ensemble.make_ensemble(cfg.model, params)
    assert model.folds == 2
    seg = np.mean([np.asarray(o["seg_prob"]) for o in per_fold], axis=0)
    cls = np.mean([np.asarray(o["cls_prob"]) for o in per_fold], axis=0)
    windows = model.windows(images)
    assert windows["cls_prob"] is None
    np.testing.assert_allclose(windows["seg_prob"], seg, atol=1e-5)
    voi = model.voi(images)
    np.testing.assert_allclose(voi["seg_prob"], seg, atol=1e-5)
    np.testing.assert_allclose(voi["cls_prob"], cls, atol=1e-5)
    assert not np.allclose(per_fold[0]["seg_prob"], per_fold[1]["seg_prob"], atol=1e-3)


def test_offsets_recentre_each_fold_on_its_own_threshold(two_folds):
    cfg, params = two_folds
    images = np.random.default_rng(2).random((2, 16, 16, 16, 1), dtype=np.float32)
    per_fold = [np.asarray(train_lib.make_predict_fn(cfg)(p, images)["seg_prob"]) for p in params]
    thresholds = [float(np.quantile(per_fold[0], 0.3)), float(np.quantile(per_fold[1], 0.8))]
    offsets = [ensemble.logit_offset(t, 0.5) for t in thresholds]
    for k in range(2):  # one fold: above 0.5 after the offset exactly where above its own
        single = ensemble.make_ensemble(cfg.model, [params[k]], offsets=[offsets[k]])
        np.testing.assert_array_equal(single.windows(images)["seg_prob"] >= 0.5,
                                      per_fold[k] >= thresholds[k])
    both = ensemble.make_ensemble(cfg.model, params, offsets=offsets).windows(images)
    assert not np.allclose(both["seg_prob"], np.mean(per_fold, axis=0), atol=1e-3)
    assert ensemble.logit_offset(0.5, 0.5) == 0.0
    with pytest.raises(ValueError, match="offsets"):
        ensemble.make_ensemble(cfg.model, params, offsets=[0.0])


def skewed(x):
    """Not equivariant under any cube symmetry: a different ramp along each axis."""
    d, h, w = (jnp.linspace(0.1, 1.0, x.shape[k])**(k + 1) for k in (1, 2, 3))
    return x * d[:, None, None] + 0.3 * x**2 * h[None, :, None] * w[None, None, :]


@pytest.mark.parametrize("tta", ["flips", "all"])
def test_device_tta_equals_host_tta(tta):
    images = np.random.default_rng(1).random((2, 16, 16, 16), dtype=np.float32)
    device = np.asarray(ensemble.tta_mean(skewed, jnp.asarray(images), tta))
    host = inference.with_tta(lambda x: {"seg_prob": np.asarray(skewed(jnp.asarray(x[..., 0])))},
                              tta)(images[..., None])["seg_prob"][..., 0]
    np.testing.assert_allclose(device, host, atol=1e-6)
    np.testing.assert_allclose(ensemble.tta_mean(jnp.sqrt, jnp.asarray(images), tta),
                               np.sqrt(images), atol=1e-6)  # equivariant: unchanged
    assert not np.allclose(device, np.asarray(skewed(jnp.asarray(images))), atol=1e-3)


def test_views_are_undone():
    x = jnp.asarray(np.random.default_rng(2).random((1, 16, 16, 16), dtype=np.float32))
    for index in range(48):
        np.testing.assert_array_equal(ensemble.unview(ensemble.view(x, index), index), x)
    assert len({np.asarray(ensemble.view(x, k)).tobytes() for k in range(48)}) == 48


def test_unknown_tta_is_refused(two_folds):
    cfg, params = two_folds
    with pytest.raises(ValueError, match="tta"):
        ensemble.make_ensemble(cfg.model, params, "rotations")


def test_larger_windows_stay_close_to_training_size_windows(tiny_run, tiny_cohort):
    """The tiny run's fold (16^3 VOIs) on a preprocessed cohort scan: 32^3 windows give
    nearly the probabilities of 16^3 windows (the network is fully convolutional; only the
    context beyond 16 voxels and the zero padding at window borders differ)."""
    from mlssp_jax import manifest, nifti, preprocess

    cfg = config.load(tiny_run / "config.toml")
    model = ensemble.make_ensemble(cfg.model, [checkpointing.restore_best_params(tiny_run, 0)[0]])
    image = nifti.load_image(manifest.read_manifest(tiny_cohort)[0].image)
    pre = preprocess.preprocess_volume(image, None, cfg.data)
    small = inference.predict_volume(pre["image"], pre["brain"], model, 16, 0.5, 4)
    large = inference.predict_volume(pre["image"], pre["brain"], model, 32, 0.5, 4)
    brain = pre["brain"].astype(bool)
    diff = np.abs(large - small)[brain]
    assert diff.mean() < 0.05 and np.percentile(diff, 99) < 0.3


def test_each_fold_classification_is_calibrated_before_the_mean(two_folds):
    cfg, params = two_folds
    images = np.random.default_rng(3).random((2, 16, 16, 16, 1), dtype=np.float32)
    per_fold = [np.asarray(train_lib.make_predict_fn(cfg)(p, images)["cls_prob"]) for p in params]
    cals = [calibration.Calibration("platt", 3.0, -1.0, 8), calibration.Calibration()]
    voi = ensemble.make_ensemble(cfg.model, params, calibrations=cals).voi(images)
    expected = np.mean([cals[0].apply(per_fold[0]), per_fold[1]], axis=0)
    np.testing.assert_allclose(voi["cls_prob"], expected, atol=1e-5)
    assert not np.allclose(voi["cls_prob"], np.mean(per_fold, axis=0), atol=1e-3)
    with pytest.raises(ValueError, match="calibrations"):
        ensemble.make_ensemble(cfg.model, params, calibrations=cals[:1])
