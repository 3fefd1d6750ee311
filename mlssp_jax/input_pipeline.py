"""Host data loader: VOIs in memory, a deterministic grain pipeline per epoch, per-host shares.

``load_examples`` crops each preprocessed subject's VOI (plus a margin for centre jitter)
once. ``train_batches`` builds, per epoch, the grain pipeline::

    MapDataset.source(examples) -> shuffle(epoch seed) -> random_map(jitter + augment, epoch
    seed) -> batch(b) -> this host's chunks -> [mp_prefetch(workers)]

The epoch seed is derived from ``(seed, epoch)`` and grain seeds each sample's generator
from (epoch seed, global position), so order and augmentation are a pure function of
(seed, epoch, index): a resumed run sees exactly the batches of an uninterrupted one, with
any worker count. Global batch ``g`` holds positions ``g*B .. g*B+B-1``; process ``p`` of
``P`` gets the contiguous ``b = B/P`` of them starting at ``g*B + p*b``, so the hosts' shares
concatenate to the global batch. Arrays are channels-last: image/mask (b, S, S, S, 1).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags

from mlssp_jax import augment, patches, preprocess, voi
from mlssp_jax.config import Config
from mlssp_jax.errors import InputError

log = logging.getLogger(__name__)


def load_examples(paths: Mapping[str, Path], ids: Sequence[str],
                  labels: Sequence[int] | Mapping[str, int], voi_size: int,
                  margin: int = 0, whole_volumes: bool = False) -> list[dict[str, Any]]:
    """Load the VOIs of ``ids`` from preprocessed npz files, centred on each lesion's centroid.

    Each example: ``subject_id``, ``image`` float32 and ``mask`` uint8 of shape (S', S', S')
    with ``S' = voi_size + 2 * margin`` (the margin lets training jitter the centre by up to
    ``margin`` voxels, :func:`mlssp_jax.augment.jitter_voxels`), ``voi_size``, ``label``
    float32, ``centre`` (3,) int voxel index in the preprocessed volume, ``affine`` (4, 4) of
    that volume. ``labels``: aligned with ``ids``, or a mapping from id. ``whole_volumes`` (for
    ``augment.background_fraction`` > 0) also keeps the whole preprocessed ``volume_image``
    float32 and ``volume_mask`` uint8 (I, J, K) and ``brain_voxels``, the flat indices of the
    brain mask's voxels (all voxels if it is empty). Logs how many lesions do not fit in the VOI
    (they are cropped around the centroid).
    """
    size = voi_size + 2 * margin
    examples, exceeding = [], []
    for position, subject_id in enumerate(ids):
        label = labels[subject_id] if isinstance(labels, Mapping) else labels[position]
        with np.load(paths[subject_id]) as npz:
            image, mask, affine = npz["image"], npz["mask"], npz["affine"]
            brain = npz["brain"] if whole_volumes else None
        centre = voi.lesion_centre(mask)
        if voi.lesion_exceeds(mask, voi_size):
            exceeding.append(subject_id)
        example = {"subject_id": subject_id, "label": np.float32(label), "centre": centre,
                   "affine": affine, "voi_size": voi_size,
                   "image": voi.crop(image, centre, size, 0.0),
                   "mask": voi.crop(mask, centre, size, 0)}
        if whole_volumes:
            example.update(volume_image=image, volume_mask=mask, brain_voxels=np.flatnonzero(
                brain if brain.any() else np.ones_like(brain)).astype(np.int32))
        examples.append(example)
    log.info("loaded %d VOIs of %d^3; %d lesions exceed the VOI and are cropped around their "
             "centroid%s", len(examples), voi_size, len(exceeding),
             f": {', '.join(exceeding)}" if exceeding else "")
    return examples


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Training steps in one epoch: full global batches only (the remainder is dropped)."""
    return n_examples // global_batch


def epoch_seed(seed: int, epoch: int) -> int:
    """The grain seed (uint32) of one epoch: a pure function of ``(seed, epoch)``."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _centre_crop(array: np.ndarray, size: int, offset: np.ndarray) -> np.ndarray:
    lo = (array.shape[0] - size) // 2 + offset
    return array[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]


class TrainTransform:
    """grain random map: pick the training patch, augment, and format one training example.

    ``data.sampling = "lesion"``: the lesion's VOI, its centre jittered by at most the
    examples' margin, or with probability ``augment.background_fraction`` one centred on a
    uniformly drawn brain voxel (``cls_weight`` 0: its label says nothing about what it
    shows). ``"whole_volume"``: :func:`patches.sample_patch` of the whole volume, then the
    scanner look in HU (:func:`augment.hu_transform`), then windowing.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.voi_size = cfg.data.voi_size
        self.augment_cfg = cfg.augment
        self.spacing_mm = cfg.data.spacing_mm  # the grid's voxel size: mm lengths -> voxels

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.cfg.data.sampling == "whole_volume":
            cropped, weight = self._volume_patch(example, rng)
        else:
            fraction = self.augment_cfg.background_fraction
            background = fraction > 0 and rng.random() < fraction  # no draw at 0: as before
            cropped = self._background_voi(example, rng) if background else self._lesion_voi(
                example, rng)
            weight = np.float32(0.0 if background else 1.0)
        out = augment.random_transform(cropped, rng, self.augment_cfg, self.spacing_mm)
        return {"image": out["image"][..., None].astype(np.float32),
                "mask": out["mask"][..., None].astype(np.float32),
                "label": np.float32(out["label"]), "cls_weight": np.float32(weight)}

    def _volume_patch(self, example: dict[str, Any],
                      rng: np.random.Generator) -> tuple[dict[str, Any], np.float32]:
        d = self.cfg.data
        patch = patches.sample_patch(example, rng, self.voi_size, d.lesion_patch_fraction,
                                     d.cls_min_lesion_fraction)
        patch = augment.hu_transform(patch, rng, self.augment_cfg)
        image = np.where(patch["brain"], preprocess.window(patch["hu"], d.window_level_hu,
                                                d.window_width_hu), 0.0)
        return {"image": image.astype(np.float32), "mask": patch["mask"],
                "label": patch["label"]}, patch["cls_weight"]

    def _lesion_voi(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        margin = (example["image"].shape[0] - self.voi_size) // 2
        jitter = min(augment.jitter_voxels(self.augment_cfg, self.spacing_mm), margin)
        offset = rng.integers(-jitter, jitter + 1, size=3)
        return {"image": _centre_crop(example["image"], self.voi_size, offset),
                "mask": _centre_crop(example["mask"], self.voi_size, offset),
                "label": example["label"]}

    def _background_voi(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "brain_voxels" not in example:
            raise ValueError("augment.background_fraction > 0 needs examples loaded with "
                             "load_examples(..., whole_volumes=True)")
        brain = example["brain_voxels"]
        shape = example["volume_image"].shape
        centre = np.array(np.unravel_index(brain[rng.integers(len(brain))], shape))
        return {"image": voi.crop(example["volume_image"], centre, self.voi_size, 0.0),
                "mask": voi.crop(example["volume_mask"], centre, self.voi_size, 0),
                "label": example["label"]}


def _check_batching(n_examples: int, global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise InputError(f"train.batch_size: global batch {global_batch} is not divisible by "
                         f"the {process_count} processes")
    if steps_per_epoch(n_examples, global_batch) == 0:
        raise InputError(f"train.batch_size: global batch {global_batch} is larger than the "
                         f"{n_examples} training subjects")
    return global_batch // process_count


def train_dataset(examples: Sequence[dict[str, Any]], cfg: Config, seed: int, epoch: int, *,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This host's batches of one epoch as a grain ``MapDataset`` (random access, no workers)."""
    global_batch = cfg.train.batch_size
    samples = list(examples) * cfg.train.patches_per_subject  # references, not copies
    local_batch = _check_batching(len(samples), global_batch, process_count)
    steps = steps_per_epoch(len(samples), global_batch)
    ds_seed = epoch_seed(seed, epoch)
    ds = (grain.MapDataset.source(samples)
          .shuffle(seed=ds_seed)
          .random_map(TrainTransform(cfg), seed=ds_seed)
          .batch(local_batch, drop_remainder=True))
    return ds[process_index:steps * process_count:process_count]


def train_batches(examples: Sequence[dict[str, Any]], cfg: Config, seed: int, epoch: int, *,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Iterate this host's batches of one epoch (``steps_per_epoch`` of ``len(examples) *
    train.patches_per_subject`` samples).

    Each batch: ``image``/``mask`` (b, S, S, S, 1) float32, ``label`` and ``cls_weight``
    (b,) float32 with ``b = train.batch_size / process_count`` (``cls_weight`` 0 marks the
    background VOIs of ``augment.background_fraction``, 1 the lesion's). ``train.workers``
    > 0 runs the augmentation in that many grain worker processes (``train.prefetch``
    batches buffered per worker); with 0 workers one thread prepares up to
    ``train.prefetch`` batches ahead (0: none, inline).
    The batches are the same in every case.
    """
    ds = train_dataset(examples, cfg, seed, epoch, process_index=process_index,
                       process_count=process_count)
    if cfg.train.workers == 0:
        if cfg.train.prefetch == 0:
            yield from (ds[i] for i in range(len(ds)))
        else:
            read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.train.prefetch)
            yield from ds.to_iter_dataset(read)
        return
    _allow_unparsed_absl_flags()
    options = grain.MultiprocessingOptions(num_workers=cfg.train.workers,
                                           per_worker_buffer_size=max(1, cfg.train.prefetch))
    iterator = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(options))
    try:
        for batch in iterator:  # copy out of grain's shared memory (freed when dropped)
            yield {key: np.array(value) for key, value in batch.items()}
    finally:
        iterator.close()


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18's ``mp_prefetch`` reads an absl flag, which fails unless flags were parsed
    (google/grain#1355, fixed after 0.2.18): mark them parsed (with defaults) if nobody did."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_batches(examples: Sequence[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Un-augmented VOIs (lesion centre) in order: ``image``/``mask`` (b, S, S, S, 1) float32,
    ``label`` (b,) float32, ``subject_id`` (b,) str and ``valid`` (b,) bool.

    The last batch is padded to ``batch_size`` with zero images and masks, label 0, id ""
    and ``valid`` False.
    """
    for start in range(0, len(examples), batch_size):
        chunk = [_eval_example(e) for e in examples[start:start + batch_size]]
        n_pad = batch_size - len(chunk)
        pad = {"image": np.zeros_like(chunk[0]["image"]), "mask": np.zeros_like(chunk[0]["mask"]),
               "label": np.float32(0), "subject_id": ""}
        chunk += [pad] * n_pad
        batch = {key: np.stack([e[key] for e in chunk]) for key in pad}
        batch["valid"] = np.arange(batch_size) < batch_size - n_pad
        yield batch


def _eval_example(example: dict[str, Any]) -> dict[str, Any]:
    """The VOI at the lesion centre (no jitter), formatted like a training example."""
    size = int(example.get("voi_size", example["image"].shape[0]))
    centred = np.zeros(3, dtype=int)
    return {"image": _centre_crop(example["image"], size, centred)[..., None].astype(np.float32),
            "mask": _centre_crop(example["mask"], size, centred)[..., None].astype(np.float32),
            "label": np.float32(example["label"]), "subject_id": example["subject_id"]}
