"""Loader: VOIs from npz, deterministic (seed, epoch, index) batches, per-host shares, workers."""

import dataclasses
import logging

import numpy as np
import pytest

from mlssp_jax import input_pipeline
from mlssp_jax.config import AugmentConfig, Config, DataConfig, TrainConfig
from mlssp_jax.errors import InputError

S = 16


def _examples(n=10, margin=2):
    """Examples whose image is 0.8 on the lesion and random in [0, 0.5) elsewhere."""
    rng = np.random.default_rng(0)
    size = S + 2 * margin
    out = []
    for i in range(n):
        mask = np.zeros((size,) * 3, np.uint8)
        lo = rng.integers(2, size - 8, 3)
        mask[lo[0]:lo[0] + 6, lo[1]:lo[1] + 4, lo[2]:lo[2] + 3] = 1
        image = np.where(mask, 0.8, rng.random(mask.shape) * 0.5).astype(np.float32)
        out.append({"subject_id": f"s{i}", "image": image, "mask": mask, "label": np.float32(i % 2),
                    "voi_size": S})
    return out


def _cfg(batch=4, workers=0, jitter=2, **augment):
    return Config(data=DataConfig(voi_size=S),
                  augment=AugmentConfig(voi_jitter_mm=jitter, **augment),
                  train=TrainConfig(batch_size=batch, workers=workers, prefetch=1))


def _collect(examples, cfg, seed, epoch, **kw):
    return list(input_pipeline.train_batches(examples, cfg, seed, epoch, **kw))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_shape_alignment_and_drop_remainder():
    batches = _collect(_examples(), _cfg(), seed=0, epoch=0)
    assert len(batches) == input_pipeline.steps_per_epoch(10, 4) == 2
    for batch in batches:
        assert batch["image"].shape == (4, S, S, S, 1) and batch["image"].dtype == np.float32
        assert batch["mask"].shape == (4, S, S, S, 1) and batch["mask"].dtype == np.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.float32
        # symmetries + jitter moved image and mask together: lesion voxels are exactly 0.8
        np.testing.assert_array_equal(batch["image"][batch["mask"] == 1], np.float32(0.8))
        assert (batch["image"][batch["mask"] == 0] < 0.5).all()


def test_order_and_augmentation_pure_function_of_seed_and_epoch():
    examples, cfg = _examples(), _cfg()
    first = _collect(examples, cfg, seed=3, epoch=5)
    _assert_same(first, _collect(examples, cfg, seed=3, epoch=5))
    other = _collect(examples, cfg, seed=3, epoch=6)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    other_seed = _collect(examples, cfg, seed=4, epoch=5)
    assert not np.array_equal(first[0]["image"], other_seed[0]["image"])


def test_host_shares_concatenate_to_global_batch():
    examples, cfg = _examples(), _cfg(random_affine=True)
    whole = _collect(examples, cfg, seed=1, epoch=2)
    shares = [_collect(examples, cfg, seed=1, epoch=2, process_index=p, process_count=2)
              for p in range(2)]
    assert all(len(s) == len(whole) for s in shares)
    for g, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([shares[0][g][key], shares[1][g][key]]), batch[key])
    assert shares[0][0]["image"].shape[0] == 2


def test_worker_processes_give_the_same_batches():
    examples = _examples(n=6)
    serial = _collect(examples, _cfg(batch=2, workers=0), seed=0, epoch=1)
    inline_cfg = _cfg(batch=2, workers=0)
    inline_cfg = dataclasses.replace(inline_cfg, train=dataclasses.replace(inline_cfg.train,
                                                                           prefetch=0))
    _assert_same(serial, _collect(examples, inline_cfg, seed=0, epoch=1))
    parallel = _collect(examples, _cfg(batch=2, workers=2), seed=0, epoch=1)
    _assert_same(serial, parallel)
    assert type(parallel[0]["image"]) is np.ndarray  # copied out of shared memory


def test_bad_batch_sizes():
    with pytest.raises(InputError, match="train.batch_size"):
        _collect(_examples(n=3), _cfg(batch=4), seed=0, epoch=0)
    with pytest.raises(InputError, match="divisible"):
        _collect(_examples(), _cfg(batch=3), seed=0, epoch=0, process_count=2)


def test_eval_batches_unaugmented_and_padded():
    examples = _examples(n=5)
    batches = list(input_pipeline.eval_batches(examples, 2))
    assert len(batches) == 3
    last = batches[-1]
    assert last["valid"].tolist() == [True, False] and last["subject_id"].tolist() == ["s4", ""]
    assert not last["image"][1].any() and not last["mask"][1].any()
    centre = examples[4]["image"][2:2 + S, 2:2 + S, 2:2 + S]
    np.testing.assert_array_equal(last["image"][0, ..., 0], centre)
    assert batches[0]["label"].tolist() == [0.0, 1.0]


def test_load_examples_centres_voi_and_counts_large_lesions(tmp_path, caplog):
    paths = {}
    for sid, half in (("small", 3), ("large", 12)):
        mask = np.zeros((50, 60, 40), np.uint8)
        mask[30 - half:30 + half, 20:24, 0:4] = 1  # centroid (29.5, 21.5, 1.5) -> (30, 22, 2)
        image = np.where(mask, 0.9, 0.1).astype(np.float32)
        paths[sid] = tmp_path / f"{sid}.npz"
        np.savez(paths[sid], image=image, mask=mask, brain=np.ones_like(mask), affine=np.eye(4))
    with caplog.at_level(logging.INFO, logger="mlssp_jax.input_pipeline"):
        examples = input_pipeline.load_examples(paths, ["small", "large"], [0, 1], S, margin=1)
    assert "1 lesions exceed the VOI" in caplog.text and "large" in caplog.text
    small = examples[0]
    assert small["image"].shape == (S + 2,) * 3 and small["label"] == 0.0
    assert small["centre"].tolist() == [30, 22, 2]
    assert small["mask"].sum() == 6 * 4 * 4  # the whole lesion is inside the VOI
    # VOI voxel v is volume voxel centre - 9 + v: k < 7 is outside the volume, padded with 0
    assert (small["image"][:, :, :7] == 0).all() and (small["image"][:, :, 7:] > 0).all()
    examples_by_map = input_pipeline.load_examples(paths, ["large"], {"large": 1}, S)
    assert examples_by_map[0]["label"] == 1.0 and examples_by_map[0]["image"].shape == (S,) * 3


def test_epoch_seed_is_stable():
    assert input_pipeline.epoch_seed(0, 1) == input_pipeline.epoch_seed(0, 1)
    assert input_pipeline.epoch_seed(0, 1) != input_pipeline.epoch_seed(0, 2)
    cfg = dataclasses.replace(_cfg(), train=dataclasses.replace(_cfg().train, batch_size=2))
    assert len(_collect(_examples(n=5), cfg, seed=0, epoch=0)) == 2


BRAIN = (slice(10, 22), slice(12, 30), slice(8, 20))  # the brain box of _volume_examples


def _volume_examples(tmp_path, n=10, whole_volumes=True):
    """Examples from npz volumes (40^3): 0 outside a brain box, 0.8 on a lesion in it and
    random in [0.1, 0.5) elsewhere in it."""
    rng = np.random.default_rng(1)
    paths = {}
    for i in range(n):
        brain = np.zeros((40,) * 3, np.uint8)
        brain[BRAIN] = 1
        mask = np.zeros_like(brain)
        lo = rng.integers(0, 6, 3) + (11, 13, 9)
        mask[lo[0]:lo[0] + 4, lo[1]:lo[1] + 3, lo[2]:lo[2] + 2] = 1
        image = np.where(mask, 0.8, brain * (0.1 + 0.4 * rng.random(brain.shape)))
        paths[f"s{i}"] = tmp_path / f"s{i}.npz"
        np.savez(paths[f"s{i}"], image=image.astype(np.float32), mask=mask, brain=brain,
                 affine=np.eye(4))
    return input_pipeline.load_examples(paths, list(paths), [i % 2 for i in range(n)], S,
                                        whole_volumes=whole_volumes)


def test_background_vois_are_in_the_brain_and_deterministic(tmp_path):
    examples = _volume_examples(tmp_path)
    assert examples[0]["volume_image"].shape == (40,) * 3
    assert len(examples[0]["brain_voxels"]) == 12 * 18 * 12
    cfg = _cfg(jitter=0, symmetries=False, background_fraction=0.5)
    batches = [b for epoch in range(4) for b in _collect(examples, cfg, seed=3, epoch=epoch)]
    weights = np.concatenate([b["cls_weight"] for b in batches])
    assert set(weights.tolist()) == {0.0, 1.0} and 0.25 < np.mean(weights == 0) < 0.75
    c = S // 2  # the VOI's centre voxel (no symmetries, no jitter)
    for batch in batches:
        for image, mask, weight in zip(batch["image"], batch["mask"], batch["cls_weight"],
                                       strict=True):
            assert image[c, c, c, 0] > 0  # the centre is a brain voxel
            np.testing.assert_array_equal(mask, image == np.float32(0.8))  # aligned crops
            if weight == 1:
                assert mask.sum() == 4 * 3 * 2  # the lesion's VOI holds the whole lesion
    _assert_same(batches[:2], _collect(examples, cfg, seed=3, epoch=0))
    assert not np.array_equal(weights[:8], np.concatenate(
        [b["cls_weight"] for b in _collect(examples, cfg, seed=4, epoch=0)]))


def test_background_fraction_zero_is_the_lesion_voi_only(tmp_path):
    cfg = _cfg(jitter=0)
    with_volumes = _collect(_volume_examples(tmp_path), cfg, seed=0, epoch=1)
    assert all((b["cls_weight"] == 1).all() for b in with_volumes)
    _assert_same(with_volumes,
                 _collect(_volume_examples(tmp_path, whole_volumes=False), cfg, seed=0, epoch=1))
    cfg = _cfg(jitter=0, background_fraction=0.5)
    with pytest.raises(ValueError, match="whole_volumes"):
        _collect(_volume_examples(tmp_path, whole_volumes=False), cfg, seed=0, epoch=1)
