"""The 48 cube symmetries form a group; random transforms keep masks binary and aligned."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from mlssp_jax import augment
from mlssp_jax.config import AugmentConfig


@pytest.fixture(scope="module")
def generic():
    return np.random.default_rng(0).standard_normal((5, 5, 5)).astype(np.float32)


def test_identity_is_index_zero(generic):
    np.testing.assert_array_equal(augment.symmetry(0, generic), generic)


def test_all_48_distinct(generic):
    outputs = {augment.symmetry(i, generic).tobytes() for i in range(48)}
    assert len(outputs) == 48


def test_closed_under_composition(generic):
    outputs = {augment.symmetry(i, generic).tobytes() for i in range(48)}
    for a in range(48):
        for b in range(48):
            assert augment.symmetry(a, augment.symmetry(b, generic)).tobytes() in outputs


def test_inverses(generic):
    for a in range(48):
        inv = augment.inverse(a)
        np.testing.assert_array_equal(augment.symmetry(inv, augment.symmetry(a, generic)), generic)
        np.testing.assert_array_equal(augment.symmetry(a, augment.symmetry(inv, generic)), generic)


def test_symmetry_keeps_channels_and_rejects_bad_index(generic):
    with_channel = generic[..., None]
    assert augment.symmetry(17, with_channel).shape == (5, 5, 5, 1)
    np.testing.assert_array_equal(augment.symmetry(17, with_channel)[..., 0],
                                  augment.symmetry(17, generic))
    with pytest.raises(ValueError):
        augment.symmetry(48, generic)


def _sphere_example(size=24, radius=6.0):
    grid = np.indices((size,) * 3) - (size - 1) / 2
    inside = (grid**2).sum(0) <= radius**2
    image = np.where(inside, 0.8, 0.2).astype(np.float32)
    return {"image": image, "mask": inside.astype(np.uint8), "label": np.float32(1)}


ALL_ON = AugmentConfig(random_affine=True, elastic=True, intensity=True, rotate_deg=15.0,
                       elastic_alpha_mm=1.5, elastic_sigma_mm=4.0)


@pytest.mark.parametrize("cfg", [dataclasses.replace(ALL_ON, elastic=False),
                                 dataclasses.replace(ALL_ON, random_affine=False), ALL_ON])
def test_random_transform_mask_binary_and_aligned(cfg):
    example = _sphere_example()
    out = augment.random_transform(example, np.random.default_rng(3), cfg, 1.0)
    assert out["image"].dtype == np.float32 and out["image"].shape == example["image"].shape
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].dtype == np.uint8
    assert out["label"] == 1
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    # aligned: the bright sphere and the mask coincide (apart from the boundary layer)
    inside = out["image"][out["mask"] == 1].mean()
    outside = out["image"][(out["mask"] == 0) & (out["image"] > 0)].mean()
    assert inside - outside > 0.4
    ratio = out["mask"].sum() / example["mask"].sum()
    assert 0.6 < ratio < 1.6  # scale 1 +- 0.1 changes volume by at most ~1.33x
    np.testing.assert_allclose(ndimage.center_of_mass(out["mask"]), [11.5] * 3, atol=2.0)


def test_random_transform_is_deterministic_in_the_generator():
    example = _sphere_example()
    a = augment.random_transform(example, np.random.default_rng(7), ALL_ON, 1.0)
    b = augment.random_transform(example, np.random.default_rng(7), ALL_ON, 1.0)
    c = augment.random_transform(example, np.random.default_rng(8), ALL_ON, 1.0)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_paper_config_only_permutes_voxels():
    example = _sphere_example()
    example["image"] = np.random.default_rng(1).random((24, 24, 24)).astype(np.float32)
    out = augment.random_transform(example, np.random.default_rng(5), AugmentConfig(), 1.0)
    np.testing.assert_array_equal(np.sort(out["image"], axis=None),
                                  np.sort(example["image"], axis=None))
    assert out["image"].flags.c_contiguous


def test_elastic_displacement_size_and_smoothness():
    cfg = AugmentConfig(elastic=True, elastic_alpha_mm=3.0, elastic_sigma_mm=6.0)
    field = augment.elastic_displacement((32, 32, 32), np.random.default_rng(0), cfg, 1.0)
    assert field.shape == (3, 32, 32, 32)
    np.testing.assert_allclose(field.std(axis=(1, 2, 3)), 3.0, rtol=0.1)
    neighbours = np.corrcoef(field[0, :-1].ravel(), field[0, 1:].ravel())[0, 1]
    assert neighbours > 0.95  # smooth at the voxel scale


def _hu_example(seed=0, shape=(16, 16, 16)):
    """Skull-stripped HU: 30 +- 5 HU noise in a brain box, -1024 outside."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[2:-2, 3:-3, 2:-2] = True
    hu = np.where(brain, 30.0 + 5.0 * rng.standard_normal(shape), -1024.0).astype(np.float32)
    return {"hu": hu, "brain": brain, "mask": np.zeros(shape, np.uint8), "label": 0,
            "spacing_mm": 2.0}


def _hu(example, seed=1, **fields):
    return augment.hu_transform(example, np.random.default_rng(seed), AugmentConfig(**fields))


def test_hu_transform_off_is_the_identity_without_draws():
    example, rng = _hu_example(), np.random.default_rng(3)
    out = augment.hu_transform(example, rng, AugmentConfig())
    np.testing.assert_array_equal(out["hu"], example["hu"])
    assert rng.random() == np.random.default_rng(3).random()


def test_hu_offset_and_scale_shift_and_stretch_the_brain_only():
    example = _hu_example()
    brain, hu = example["brain"], example["hu"]
    shifted = _hu(example, hu_offset=10.0)["hu"]
    delta = np.unique(np.round(shifted[brain] - hu[brain], 3))
    assert len(delta) == 1 and 0 < abs(delta[0]) <= 10.0
    np.testing.assert_array_equal(shifted[~brain], hu[~brain])
    scaled = _hu(example, hu_scale_fraction=0.2)["hu"]
    ratio = np.unique(np.round(scaled[brain] / hu[brain], 4))
    assert len(ratio) == 1 and 0.8 <= ratio[0] <= 1.2 and ratio[0] != 1.0


def test_hu_noise_adds_noise_up_to_its_level_inside_the_brain():
    example = _hu_example()
    brain = example["brain"]
    sds = [np.std(_hu(example, seed=s, hu_noise_max=8.0)["hu"][brain] - example["hu"][brain])
           for s in range(20)]
    assert 0 < min(sds) and max(sds) <= 8.0 * 1.05 and max(sds) > 4.0
    np.testing.assert_array_equal(_hu(example, hu_noise_max=8.0)["hu"][~brain],
                                  example["hu"][~brain])


def test_point_spread_blurs_or_sharpens_without_bleeding_the_background():
    example = _hu_example()
    brain, sd = example["brain"], np.std(example["hu"][example["brain"]])
    blurred = _hu(example, blur_sigma_max_mm=4.0)["hu"]
    sharpened = _hu(example, sharpen_max=1.0)["hu"]
    assert np.std(blurred[brain]) < sd < np.std(sharpened[brain])
    flat = {**example, "hu": np.where(brain, 30.0, -1024.0).astype(np.float32)}
    for fields in ({"blur_sigma_max_mm": 4.0}, {"sharpen_max": 1.0}):
        np.testing.assert_allclose(_hu(flat, **fields)["hu"][brain], 30.0, atol=1e-3)


def test_slice_thickness_blurs_along_the_superior_axis_only():
    example = _hu_example()
    brain = example["brain"]
    k = np.arange(16, dtype=np.float32)
    along_k = {**example, "hu": np.where(brain, 30 + 10 * (k % 2)[None, None, :], -1024.0)}
    along_i = {**example, "hu": np.where(brain, 30 + 10 * (k % 2)[:, None, None], -1024.0)}
    out_k = _hu(along_k, slice_thickness_max_mm=10.0)["hu"]
    out_i = _hu(along_i, slice_thickness_max_mm=10.0)["hu"]
    assert np.std(out_k[brain]) < 0.9 * np.std(along_k["hu"][brain])
    np.testing.assert_allclose(out_i[brain], along_i["hu"][brain], atol=1e-3)


def test_lengths_in_mm_are_converted_through_the_spacing():
    """data.spacing_mm = 2: 3 mm of displacement is 1.5 voxels, a jitter of 8 mm is 4 voxels."""
    cfg = AugmentConfig(elastic=True, elastic_alpha_mm=3.0, elastic_sigma_mm=6.0, voi_jitter_mm=8)
    field = augment.elastic_displacement((32, 32, 32), np.random.default_rng(0), cfg, 2.0)
    np.testing.assert_allclose(field.std(axis=(1, 2, 3)), 1.5, rtol=0.1)
    assert augment.jitter_voxels(cfg, 2.0) == 4 and augment.jitter_voxels(cfg, 1.0) == 8
    assert augment.jitter_voxels(dataclasses.replace(cfg, voi_jitter_mm=3), 2.0) == 1
