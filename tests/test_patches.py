"""Patch sampling from whole volumes: lesion share, patches inside the volume, determinism."""

import dataclasses

import numpy as np

from mlssp_jax import input_pipeline, patches
from mlssp_jax.config import AugmentConfig, Config, DataConfig, TrainConfig

S = 16


def _volume(shape=(40, 36, 30), seed=0):
    """A whole-volume example: brain box, a 4x3x2 lesion in it, HU 30 brain / 70 lesion."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, np.uint8)
    brain[4:-4, 5:-5, 3:-3] = 1
    mask = np.zeros(shape, np.uint8)
    lo = rng.integers(6, 12, 3)
    mask[lo[0]:lo[0] + 4, lo[1]:lo[1] + 3, lo[2]:lo[2] + 2] = 1
    hu = np.where(mask, 70.0, np.where(brain, 30.0, -1024.0)).astype(np.float16)
    return {"subject_id": f"v{seed}", "label": np.float32(seed % 2), "hu": hu,
            "image": np.clip((hu.astype(np.float32) - 0) / 100, 0, 1), "brain": brain,
            "mask": mask, "affine": np.eye(4), "lesion_voxels": np.flatnonzero(mask),
            "brain_voxels": np.flatnonzero(brain), "spacing_mm": 1.0}


def test_lesion_share_matches_the_config_and_cls_weight_marks_lesion_patches():
    example, rng = _volume(), np.random.default_rng(0)
    draws = [patches.sample_patch(example, rng, S, 0.25, 0.5) for _ in range(2000)]
    share = np.mean([d["lesion_centred"] for d in draws])
    assert abs(share - 0.25) < 0.03
    for d in draws:
        held = d["mask"].sum() / example["mask"].sum()
        assert d["cls_weight"] == float(held >= 0.5)
        if d["lesion_centred"]:
            assert d["mask"].any()
    # brain-centred patches mostly miss this small lesion: no classification loss there
    assert np.mean([d["cls_weight"] for d in draws]) < 0.7


def test_patches_never_leave_the_volume_and_pad_a_smaller_one():
    example, rng = _volume(), np.random.default_rng(1)
    for _ in range(300):
        start = patches.sample_patch(example, rng, S, 0.5, 0.5)["start"]
        assert np.all(start >= 0) and np.all(start + S <= np.array(example["mask"].shape))
    small = _volume(shape=(S + 4, 10, S))  # axis 1 shorter than the patch
    patch = patches.sample_patch(small, rng, S, 1.0, 0.5)
    assert patch["start"][1] == -3 and patch["hu"].shape == (S,) * 3
    assert np.all(patch["hu"][:, :3] == -1024.0) and not patch["brain"][:, :3].any()
    assert patch["mask"].sum() == small["mask"].sum()  # the whole lesion is in the patch


def _cfg(**data):
    return Config(data=DataConfig(voi_size=S, sampling="whole_volume", **data),
                  augment=AugmentConfig(symmetries=True, hu_noise_max=5.0),
                  train=TrainConfig(batch_size=2, workers=0, prefetch=0, patches_per_subject=3))


def test_whole_volume_batches_are_deterministic_in_seed_epoch_index():
    examples = [_volume(seed=i) for i in range(4)]
    cfg = _cfg()
    first = list(input_pipeline.train_batches(examples, cfg, seed=5, epoch=2))
    again = list(input_pipeline.train_batches(examples, cfg, seed=5, epoch=2))
    other = list(input_pipeline.train_batches(examples, cfg, seed=5, epoch=3))
    assert len(first) == 4 * 3 // 2  # patches_per_subject samples per subject
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["image"], b["image"])
               for a, b in zip(first, other, strict=True))
    assert first[0]["image"].shape == (2, S, S, S, 1)
    assert 0.0 <= first[0]["image"].min() and first[0]["image"].max() <= 1.0
    shifted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                lesion_patch_fraction=1.0))
    lesion = list(input_pipeline.train_batches(examples, shifted, seed=5, epoch=2))
    assert all(b["mask"].sum(axis=(1, 2, 3, 4)).min() > 0 for b in lesion)


def test_load_volumes_reads_the_preprocessed_fields(tmp_path):
    v = _volume()
    path = tmp_path / "v0.npz"
    np.savez(path, **{k: v[k] for k in ("hu", "image", "brain", "mask")},
             affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    (loaded,) = patches.load_volumes({"v0": path}, ["v0"], {"v0": 1})
    assert loaded["spacing_mm"] == 2.0 and loaded["label"] == 1
    np.testing.assert_array_equal(loaded["lesion_voxels"], v["lesion_voxels"])
    assert loaded["hu"].dtype == np.float16
