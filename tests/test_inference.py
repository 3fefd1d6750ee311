"""Sliding-window inference, TTA, ensembling and the classification VOI, with toy predict_fns."""

from __future__ import annotations

import types

import numpy as np
import pytest
from scipy import ndimage

from mlssp_jax import inference


def identity(images):
    """Toy model: the segmentation probability is the input; class probability its mean."""
    return {"seg_prob": images, "cls_prob": images.mean(axis=(1, 2, 3, 4))}


def test_steps_cover_the_axis_like_nnunet():
    assert inference.sliding_window_steps((64, 100, 65), 64, 0.5) == [[0], [0, 18, 36], [0, 1]]
    for starts in inference.sliding_window_steps((200,), 64, 0.25):
        assert starts[0] == 0 and starts[-1] + 64 == 200
        assert max(np.diff(starts)) <= 48


def test_steps_reject_a_window_larger_than_the_volume():
    with pytest.raises(ValueError, match="smaller than the window"):
        inference.sliding_window_steps((10,), 16, 0.5)


def test_gaussian_peaks_at_the_centre_and_stays_positive():
    g = inference.gaussian_importance(16)
    assert g.shape == (16, 16, 16) and g.max() == pytest.approx(1.0)
    assert g[7, 7, 7] == g.max() and g[8, 8, 8] == g[7, 7, 7]
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])
    assert 0 < g[0, 0, 0] < 1e-3


@pytest.mark.parametrize("shape", [(20, 24, 17), (10, 16, 30)])
def test_identity_model_reproduces_the_volume(shape):
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = inference.sliding_window_predict(volume, identity, window=16, overlap=0.5, batch_size=3)
    assert out.shape == shape
    np.testing.assert_allclose(out, volume, atol=1e-6)


def test_overlapping_windows_are_gaussian_weighted():
    calls = []

    def window_index(images):
        calls.append(len(calls))
        return {"seg_prob": np.full(images.shape, float(len(calls) - 1), np.float32)}

    out = inference.sliding_window_predict(np.zeros((16, 16, 24)), window_index, 16, 0.5, 1)
    assert len(calls) == 2  # starts 0 and 8 along the last axis
    g = inference.gaussian_importance(16)[8, 8]  # the profile along the last axis
    k = np.arange(8, 16)
    np.testing.assert_allclose(out[8, 8, 8:16], g[k - 8] / (g[k] + g[k - 8]), rtol=1e-5)
    np.testing.assert_array_equal(out[:, :, :8], 0.0)
    np.testing.assert_array_equal(out[:, :, 16:], 1.0)


def test_tta_undoes_each_symmetry():
    """An equivariant model is unchanged by TTA (wrong inverses would scramble the volume)."""
    volume = np.random.default_rng(1).random((16, 16, 16), dtype=np.float32)
    out = inference.sliding_window_predict(volume, identity, 16, 0.5, 1, tta=True)
    np.testing.assert_allclose(out, volume, atol=1e-6)


def test_tta_averages_over_the_48_symmetries():
    """A model that multiplies by a ramp along one axis averages to half the input."""
    ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32)[:, None, None], (16,) * 3)

    def ramped(images):
        return {"seg_prob": images * ramp[None, ..., None]}

    volume = np.random.default_rng(2).random((16, 16, 16), dtype=np.float32)
    plain = inference.sliding_window_predict(volume, ramped, 16, 0.5, 1)
    np.testing.assert_allclose(plain, volume * ramp, atol=1e-6)
    tta = inference.sliding_window_predict(volume, ramped, 16, 0.5, 1, tta=True)
    np.testing.assert_allclose(tta, 0.5 * volume, atol=1e-5)


@pytest.mark.parametrize("tta", ["flips", "all"])
def test_tta_modes_on_the_host(tta):
    """Equivariant identity: unchanged; a ramp along axis 0 averages to half the input (every
    mode includes the flip of axis 0, which maps the ramp r to 1 - r)."""
    volume = np.random.default_rng(3).random((16, 16, 16), dtype=np.float32)
    same = inference.sliding_window_predict(volume, identity, 16, 0.5, 1, tta=tta)
    np.testing.assert_allclose(same, volume, atol=1e-6)
    ramp = np.linspace(0, 1, 16, dtype=np.float32)[:, None, None]
    out = inference.sliding_window_predict(
        volume, lambda x: {"seg_prob": x * ramp[None, ..., None]}, 16, 0.5, 1, tta=tta)
    np.testing.assert_allclose(out, 0.5 * volume, atol=1e-5)


def window_mean_model(images):
    """Toy model whose output depends on the whole window: input + the window's mean."""
    return {"seg_prob": images + images.mean(axis=(1, 2, 3, 4), keepdims=True)}


def test_brain_only_windows_equal_all_windows_inside_the_brain():
    rng = np.random.default_rng(4)
    volume = rng.random((40, 56, 48), dtype=np.float32)
    brain = np.zeros(volume.shape, bool)
    brain[5:20, 30:50, 3:30] = True
    full = inference.sliding_window_predict(volume, window_mean_model, 16, 0.5, 3)
    calls = []

    def counted(images):
        calls.append(1)
        return window_mean_model(images)

    some = inference.sliding_window_predict(volume, counted, 16, 0.5, 3, brain=brain)
    np.testing.assert_allclose(some[brain], full[brain], rtol=1e-6)
    kept = inference.window_starts(volume.shape, 16, 0.5, brain)
    total = inference.window_starts(volume.shape, 16, 0.5)
    assert len(calls) == -(-len(kept) // 3) and len(kept) < len(total) / 2
    covered = np.zeros(volume.shape, bool)
    for start in kept:
        covered[tuple(slice(a, a + 16) for a in start)] = True
    np.testing.assert_array_equal(some[~covered], 0.0)


def pointwise_model(images):
    """Toy model whose output depends on each voxel alone (a network with no context)."""
    return {"seg_prob": 1.0 / (1.0 + np.exp(-8.0 * (images - 0.5)))}


@pytest.mark.parametrize("window, overlap", [(16, 0.5), (16, 0.25), (32, 0.5), (48, 0.0),
                                             (64, 0.25)])
def test_any_window_and_overlap_give_a_context_free_model_s_result(window, overlap):
    """Window placement, Gaussian weighting, padding (64 > every axis) and the brain crop
    are exact: a model without context gives the same probability in the brain whatever
    the window, overlap and batch; the windows counted are the windows evaluated."""
    rng = np.random.default_rng(5)
    volume = rng.random((60, 44, 40), dtype=np.float32)
    brain = np.zeros(volume.shape, bool)
    brain[8:50, 6:40, 5:33] = ndimage.binary_dilation(rng.random((42, 34, 28)) > 0.7)
    calls = []

    def counted(images):
        calls.append(len(images))
        return pointwise_model(images)

    prob = inference.predict_volume(volume, brain, types.SimpleNamespace(windows=counted),
                                    window, overlap, batch_size=3)
    np.testing.assert_allclose(prob[brain], pointwise_model(volume)["seg_prob"][brain],
                               rtol=1e-6)
    assert len(calls) == -(-inference.window_count(brain, window, overlap) // 3)


def test_auto_batch_holds_about_four_32_cubed_windows_of_voxels():
    assert [inference.auto_batch(w) for w in (16, 32, 48, 64, 96)] == [32, 4, 1, 1, 1]


def test_uniform_weighting_is_the_plain_mean_of_overlapping_windows():
    calls = []

    def window_index(images):
        calls.append(len(calls))
        return {"seg_prob": np.full(images.shape, float(len(calls) - 1), np.float32)}

    out = inference.sliding_window_predict(np.zeros((16, 16, 24)), window_index, 16, 0.5, 1,
                                           gaussian=False)
    np.testing.assert_allclose(out[:, :, 8:16], 0.5)
    np.testing.assert_array_equal(out[:, :, 16:], 1.0)


def oblique_case():
    """A probability blob on a 1 mm grid and an oblique, anisotropic, larger input grid."""
    rng = np.random.default_rng(5)
    prob = np.zeros((30, 34, 28), np.float32)
    prob[8:20, 10:25, 6:14] = rng.random((12, 15, 8))
    prob_affine = np.eye(4)
    prob_affine[:3, 3] = [-15, -17, -14]
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, -1]])
    input_affine = np.eye(4)
    input_affine[:3, :3] = rot @ np.diag([0.7, 0.6, 2.5])
    input_affine[:3, 3] = [-20, -22, 15]
    return prob, prob_affine, input_affine, (64, 70, 14)


def test_resampling_the_box_equals_resampling_everything():
    prob, prob_affine, input_affine, shape = oblique_case()
    index_map = np.linalg.inv(prob_affine) @ input_affine
    full = ndimage.affine_transform(prob, index_map[:3, :3], index_map[:3, 3], output_shape=shape,
                                    order=1, mode="constant", cval=0.0)
    for threshold in (0.05, 0.5, 0.9):
        mask = inference.resample_mask(prob, prob_affine, input_affine, shape, threshold)
        assert mask.dtype == np.uint8 and mask.sum() > 0
        np.testing.assert_array_equal(mask, full >= threshold)
    assert not inference.resample_mask(prob, prob_affine, input_affine, shape, 1.5).any()


def two_blobs():
    mask = np.zeros((32, 32, 32), bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels
    mask[9:12, 11:14, 13:16] = True  # 27 voxels, centre (10, 12, 14)
    return mask


def test_classification_centre_is_the_largest_lesion_s():
    mask = two_blobs()
    np.testing.assert_array_equal(inference.classification_centre(mask * 0.9, 0.5), [10, 12, 14])


def test_centre_falls_back_to_the_most_probable_voxel():
    prob = np.zeros((8, 8, 8))
    prob[1, 2, 3] = 0.3
    np.testing.assert_array_equal(inference.classification_centre(prob, 0.5), [1, 2, 3])


def test_classify_reads_the_voi_around_the_largest_lesion():
    mask = two_blobs()
    volume = mask.astype(np.float32)
    prob, centre = inference.classify(volume, mask * 1.0, identity, voi_size=16, threshold=0.5,
                                      batch_size=3)
    np.testing.assert_array_equal(centre, [10, 12, 14])
    assert prob == pytest.approx(27 / 16**3)  # the small blob lies outside this VOI
    def no_cls(x):
        return {"seg_prob": x, "cls_prob": None}

    assert inference.classify(volume, mask * 1.0, no_cls, 16, 0.5)[0] is None
