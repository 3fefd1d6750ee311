"""Typed run configuration: TOML in (``configs/*.toml``), overrides, validation, TOML out.

A config is a frozen :class:`Config` of six sections (``data``, ``augment``, ``model``,
``train``, ``descriptors``, ``inference``). Every hyperparameter lives here; no number is
hidden in code.
Unknown keys, wrong types and out-of-range values raise :class:`~mlssp_jax.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlssp_jax.errors import InputError

MODEL_NAMES = ("mlssp", "ynet", "he", "unet3d", "cnn")
CONV_IMPLS = ("auto", "xla", "cpu", "onednn")
DTYPES = ("float32", "bfloat16")
CLS_POOLINGS = ("global", "lesion")
SAMPLINGS = ("lesion", "whole_volume")
SYNTH_PRESETS = ("default", "shifted")  # mlssp_jax.synth.settings.PRESETS
TTA_MODES = ("none", "flips", "all")  # mlssp_jax.ensemble.TTA_MODES
CLASSIFIERS = ("cnn", "descriptors")  # what predict's avm_probability and label come from
POSTPROCESS_SELECT = ("dsc", "volume", "volume_native")  # how inner validation picks a threshold
CHECKPOINT_TASKS = ("both", "segmentation")  # what the best checkpoint is chosen on
CALIBRATIONS = ("none", "temperature", "platt")  # mlssp_jax.calibration.METHODS


@dataclass(frozen=True)
class DataConfig:
    """Where the scans come from and how they are preprocessed.

    ``manifest`` empty means the built-in synthetic cohort (``synth_*`` fields).

    ``sampling``: ``"lesion"`` (the paper: training VOIs centred on the lesion, see
    ``augment.voi_jitter_mm``/``background_fraction``) or ``"whole_volume"`` (patches drawn
    from the whole preprocessed volume, :mod:`mlssp_jax.patches`): a share
    ``lesion_patch_fraction`` (nnU-Net: 1/3) centred on a random lesion voxel, the rest on a
    random brain voxel; a patch counts in the classification loss only if it holds at least
    ``cls_min_lesion_fraction`` of the lesion's voxels.

    ``strip_*``: skull stripping (:mod:`mlssp_jax.skullstrip`), HU and mm on the resampled
    grid: bone at or above ``strip_bone_hu``, its gaps closed by ``strip_bone_closing_mm``;
    brain above ``strip_brain_min_hu``; bone-like (partial-volume bone) at or above
    ``strip_bone_like_hu``, removed where connected to the skull within ``strip_rim_mm``;
    hematoma cores where the HU smoothed by ``strip_smooth_mm`` (Gaussian sigma) is in
    ``[strip_hematoma_min_hu, strip_hematoma_max_hu)`` and at least ``strip_core_mm`` deep,
    protecting the bone-like voxels within ``strip_core_mm + strip_protect_mm``, where the
    brain grows by up to ``strip_rim_grow_mm`` into the partial-volume rim below
    ``strip_rim_max_hu``.
    """

    manifest: str = ""
    synth_subjects: int = 80
    synth_avm: int = 38
    synth_seed: int = 0
    synth_small: bool = False
    synth_preset: str = "default"
    spacing_mm: float = 1.0
    window_level_hu: float = 50.0
    window_width_hu: float = 100.0
    voi_size: int = 64
    cache_dir: str = ""
    sampling: str = "lesion"
    lesion_patch_fraction: float = 1.0 / 3.0
    cls_min_lesion_fraction: float = 0.5
    strip_bone_hu: float = 300.0
    strip_bone_closing_mm: float = 2.0
    strip_brain_min_hu: float = -20.0
    strip_bone_like_hu: float = 100.0
    strip_rim_mm: float = 10.0
    strip_hematoma_min_hu: float = 50.0
    strip_hematoma_max_hu: float = 100.0
    strip_smooth_mm: float = 1.0
    strip_core_mm: float = 2.5
    strip_protect_mm: float = 10.0
    strip_rim_grow_mm: float = 4.0
    strip_rim_max_hu: float = 700.0


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation. The paper used only the 48 cube symmetries.

    ``background_fraction`` in [0, 1): the share of training samples whose VOI is centred on
    a uniformly drawn brain voxel instead of the lesion (as nnU-Net samples part of its
    patches at random), so the network also sees VOIs with little or no lesion; those
    samples do not count in the classification loss. 0 (the paper): always the lesion.

    Scanner look, on the skull-stripped HU before windowing (:func:`augment.hu_transform`;
    0 = off, the paper): ``hu_offset`` (HU, offset drawn in +-), ``hu_scale_fraction``
    (contrast about 0 HU scaled by 1 +- it), ``hu_noise_max`` (Gaussian noise, sd drawn in
    0..it HU), ``blur_sigma_max_mm`` / ``sharpen_max`` (point spread: a Gaussian blur of
    sigma in 0..it mm, or an unsharp mask of amount in 0..it; one of the two per sample),
    ``slice_thickness_max_mm`` (through-plane blur of a slice thickness in 0..it mm along the
    superior axis). ``intensity`` adds gamma and noise on the windowed image.
    """

    symmetries: bool = True
    voi_jitter_mm: int = 0
    background_fraction: float = 0.0
    random_affine: bool = False
    rotate_deg: float = 10.0
    scale_fraction: float = 0.1
    elastic: bool = False
    elastic_alpha_mm: float = 4.0
    elastic_sigma_mm: float = 6.0
    intensity: bool = False
    gamma_range: float = 0.2
    noise_std: float = 0.02
    hu_offset: float = 0.0
    hu_scale_fraction: float = 0.0
    hu_noise_max: float = 0.0
    blur_sigma_max_mm: float = 0.0
    sharpen_max: float = 0.0
    slice_thickness_max_mm: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``share_depth`` (-1 = the variant's own) moves the branch point.

    ``cls_pooling``: how the classification branch pools its last feature map, ``"global"``
    (the paper's global average) or ``"lesion"`` (segmentation-guided: weighted by the
    segmentation probability, dilated by ``cls_rim_voxels`` voxels of the pooled map to
    include the lesion's rim; see :mod:`mlssp_jax.models`). A model without a segmentation
    branch (``cnn``) pools globally whatever this says.
    """

    name: str = "mlssp"
    width: int = 32
    share_depth: int = -1
    dense_units: int = 64
    dtype: str = "float32"
    remat: bool = False
    conv_impl: str = "auto"
    cls_pooling: str = "global"
    cls_rim_voxels: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, folds, loader and checkpointing.

    ``alpha`` is a float in [0, 1] or the string ``"auto"`` (learned task weighting).
    The learning rate decays by ``lr_decay_per_epoch`` after every epoch.

    ``class_balance``: weight the classification loss of each class by
    ``n / (2 n_class)`` from the training fold's label counts (each class then weighs half).
    For ``alpha = "auto"``: ``auto_weight_lr`` is the (constant) Adam learning rate of the
    log-variances (0: the network's schedule, as before), which are clipped to
    [``log_var_min``, ``log_var_max``] after every step (task weights ``exp(-s)`` in
    [e^-max, e^-min]). ``calibration``: one of :data:`CALIBRATIONS`, the classification
    branch's post-hoc calibration (:mod:`mlssp_jax.calibration`; ``"none"``: the paper),
    fitted on the best checkpoint's inner-validation probabilities (on whole scans, from the
    VOI the pipeline finds itself, for ``data.sampling = "whole_volume"``; else the VOIs),
    saved as ``W/fold_K/calibration.json`` and applied to both held-out protocols and by
    ``predict``.
    ``calibration_bins``: the equal-width bins of the expected calibration error.
    ``checkpoint_tasks``: what the inner-validation score that picks the best checkpoint
    weighs, one of :data:`CHECKPOINT_TASKS`: ``"both"`` (the paper's tasks, the mean of DSC and
    the classification branch's AUC) or ``"segmentation"`` (the DSC; for a run whose
    classification comes from the predicted lesion's descriptors, the checkpoint that
    segments best serves both, and an AUC on a few subjects moves in steps far larger than
    the DSC's epoch-to-epoch differences).
    ``ema_decay``: keep an exponential moving average of the parameters with this decay per
    step (0 = off, the paper); the average is what the inner validation scores, what the
    checkpoints' ``params`` hold and so what evaluation and ``predict`` use (Polyak
    averaging: a smoother model than the last step's, and a less noisy checkpoint choice).
    ``warmup_epochs``: the learning rate rises linearly from ~0 over that many epochs (0 = off,
    the paper); ``grad_clip_norm``: the gradient's global norm is clipped to that before
    Adam (0 = off, the paper). Both steady a network whose classification loss reaches its
    decoder (``he``).
    ``patches_per_subject``: training samples drawn per subject and epoch.
    ``seg_bce_weight``: voxel cross-entropy added to the Dice (:func:`losses.total_loss`;
    0 = the paper); ``batch_dice``: the Dice over the whole batch (false = the paper's
    per-sample mean). Inner validation and selection: the VOI protocol for
    ``data.sampling = "lesion"``; whole scans for ``"whole_volume"`` (sliding windows with
    ``val_overlap``, cheaper than the held-out evaluation's 0.5),
    which also chooses the post-processing among none, the largest component, and dropping
    components under each of ``postprocess_min_ml`` (mL), at each probability threshold of
    ``postprocess_thresholds`` (empty: ``threshold`` only); ``postprocess_max_hu`` (> 0)
    removes predicted voxels denser than that many HU (bone, calcification; 0 = off).
    ``postprocess_select``: ``"dsc"`` takes the rule and threshold of best mean DSC;
    ``"volume"`` the component rule of best mean DSC, then, among the thresholds, the one
    whose inner-validation volumes are least biased (median signed volume error closest to
    0 mL; ties: the better DSC), a volumetry tool's calibration; ``"volume_native"`` the same
    with the volumes measured as ``predict`` writes them, on each scan's own grid (the mask
    resampled there, against the manifest's mask).
    """

    alpha: float | str = 0.4
    learning_rate: float = 1e-5
    lr_decay_per_epoch: float = 0.05
    warmup_epochs: int = 0
    grad_clip_norm: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    epochs: int = 100
    batch_size: int = 2
    seed: int = 0
    num_folds: int = 5
    inner_val_fraction: float = 0.15
    threshold: float = 0.5
    patches_per_subject: int = 1
    seg_bce_weight: float = 0.0
    batch_dice: bool = False
    val_overlap: float = 0.0
    postprocess_min_ml: tuple[float, ...] = (0.5, 1.0, 2.0)
    postprocess_thresholds: tuple[float, ...] = ()
    postprocess_max_hu: float = 0.0
    postprocess_select: str = "dsc"
    workers: int = 2
    prefetch: int = 2
    log_every_steps: int = 10
    class_balance: bool = False
    auto_weight_lr: float = 0.0
    log_var_min: float = -4.0
    log_var_max: float = 4.0
    calibration: str = "none"
    calibration_bins: int = 10
    ema_decay: float = 0.0
    checkpoint_tasks: str = "both"


@dataclass(frozen=True)
class DescriptorConfig:
    """Lesion descriptors (:mod:`mlssp_jax.descriptors`) and their logistic regression.

    Shells are measured outside the lesion in mm; ``vessel_*_hu`` is the density range of
    contrast-free blood in vessels. The relative descriptors use only soft-tissue voxels
    (``soft_min_hu``..``soft_max_hu``: bone and calcification left out) and the brain's own
    parenchyma (soft brain voxels more than ``parenchyma_gap_mm`` from the lesion) as their
    reference; ``core_mm``: the lesion's core is its voxels deeper than this below its
    boundary; ``noise_shell_mm``: the scan's noise is measured on the parenchyma out to this
    distance from the lesion; ``vessel_above_brain_hu``: a vessel voxel is at least this
    much denser than the parenchyma. ``l2_penalty`` is the regression's ridge penalty on the
    standardised coefficients (the intercept is not penalised). ``classifier``: fit the
    regression on each fold's training folds (true masks) and evaluate it on the held-out
    whole scans from the pipeline's own predicted lesion, for every model that segments
    (eval.json's ``whole_scan.descriptor_classification``, :mod:`mlssp_jax.descriptor_eval`).
    """

    rim_mm: float = 4.0
    vessel_min_mm: float = 2.0
    vessel_max_mm: float = 15.0
    vessel_min_hu: float = 55.0
    vessel_max_hu: float = 90.0
    soft_min_hu: float = -20.0
    soft_max_hu: float = 100.0
    core_mm: float = 2.0
    parenchyma_gap_mm: float = 6.0
    noise_shell_mm: float = 15.0
    vessel_above_brain_hu: float = 15.0
    l2_penalty: float = 1.0
    classifier: bool = True


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window inference of whole scans (``predict``, :mod:`mlssp_jax.inference`).

    ``window``: the window's edge in voxels, a multiple of 16 (0: the training VOI,
    ``data.voi_size``); ``overlap`` in [0, 1) (0.25: within the tolerance of 0.5 at 57% of
    its FLOPs on the quick model, ``benchmarks/window_tolerance.py``); ``batch_size``:
    windows per network call (0: about 4 x 32^3 voxels, :func:`inference.auto_batch`);
    ``gaussian``: Gaussian-weighted mean of overlapping windows (sigma = window / 8, as
    nnU-Net), else the plain mean; ``tta``: test-time augmentation, one of
    :data:`TTA_MODES` (1, 8 or 48 network evaluations per window). ``predict``'s options
    override them. ``classifier``: where ``predict``'s ``avm_probability`` and ``label`` come
    from, one of :data:`CLASSIFIERS`: the network's classification branch (``cnn``, the
    paper's) or the folds' descriptor classifiers on the predicted lesion (``descriptors``;
    null when no lesion is found; the CNN's if the run has no descriptor classifier). Both
    are written either way (``cnn_avm_probability``, ``descriptor_avm_probability``).
    """

    window: int = 0
    overlap: float = 0.25
    batch_size: int = 0
    gaussian: bool = True
    tta: str = "none"
    classifier: str = "cnn"


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    descriptors: DescriptorConfig = field(default_factory=DescriptorConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str) -> type:
    return {"data": DataConfig, "augment": AugmentConfig,
            "model": ModelConfig, "train": TrainConfig, "descriptors": DescriptorConfig,
            "inference": InferenceConfig}[name]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation (given as a string), converting ints to floats."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a TOML array
        if not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected an array, got {value!r}")
        return tuple(_coerce(v, typing.get_args(hint)[0], where) for v in value)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(o.__name__ for o in options)
    raise InputError(f"{where}: expected {names}, got {value!r}")


# Keys of earlier versions, still read from the config.toml of runs trained with them:
# (section, old key) -> old value -> (new key, new value).
LEGACY_KEYS = {("train", "temperature_scaling"):
               lambda on: ("calibration", "temperature" if on is True else "none")}


def _build_section(name: str, values: dict[str, Any], base: Any, where: str) -> Any:
    cls = _section_class(name)
    known = {f.name: f for f in dataclasses.fields(cls)}
    updates = {}
    for key, value in values.items():
        if (name, key) in LEGACY_KEYS:
            key, value = LEGACY_KEYS[name, key](value)
        if key not in known:
            raise InputError(f"{where}: unknown key '{name}.{key}'")
        updates[key] = _coerce(value, known[key].type, f"{where}: {name}.{key}")
    return dataclasses.replace(base, **updates)


def from_dict(raw: dict[str, Any], where: str = "config", base: Config | None = None) -> Config:
    """Build a validated :class:`Config` from nested dicts, on top of ``base`` (defaults)."""
    config = base or Config()
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise InputError(f"{where}: unknown section '{name}'")
        if not isinstance(values, dict):
            raise InputError(f"{where}: '{name}' must be a table")
        sections[name] = _build_section(name, values, getattr(config, name), where)
    config = dataclasses.replace(config, **sections)
    validate(config, where)
    return config


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (defaults if ``path`` is None), then apply ``key=value`` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not valid TOML: {err}") from None
        config = from_dict(raw, where=str(path))
    return apply_overrides(config, overrides or [])


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; values are parsed as TOML, else taken as strings."""
    raw: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise InputError(f"--set {item}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})[name] = value
    return from_dict(raw, where="--set", base=config) if raw else config


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise InputError(f"{where}: {message}")


def validate(config: Config, where: str = "config") -> None:
    """Raise :class:`InputError` for values out of range (and any NaN or infinite float)."""
    d, m, t, a = config.data, config.model, config.train, config.augment
    infinite = [f"{section}.{key}" for section, values in to_dict(config).items()
                for key, value in values.items()
                if isinstance(value, float) and not math.isfinite(value)]
    _check(not infinite, where, f"{', '.join(infinite)} must be finite")
    _check(m.name in MODEL_NAMES, where, f"model.name must be one of {', '.join(MODEL_NAMES)}")
    _check(m.conv_impl in CONV_IMPLS, where, f"model.conv_impl must be one of {CONV_IMPLS}")
    _check(m.dtype in DTYPES, where, f"model.dtype must be one of {DTYPES}")
    _check(m.width >= 1, where, "model.width must be >= 1")
    _check(-1 <= m.share_depth <= 4, where, "model.share_depth must be in -1..4")
    _check(d.voi_size >= 16 and d.voi_size % 16 == 0, where,
           "data.voi_size must be a positive multiple of 16")
    _check(d.spacing_mm > 0, where, "data.spacing_mm must be > 0")
    _check(d.window_width_hu > 0, where, "data.window_width_hu must be > 0")
    _validate_strip(d, where)
    _check(d.synth_subjects >= 2 and 0 <= d.synth_avm <= d.synth_subjects, where,
           "data.synth_avm must be in 0..data.synth_subjects")
    _check(d.synth_preset in SYNTH_PRESETS, where,
           f"data.synth_preset must be one of {', '.join(SYNTH_PRESETS)}")
    _check(a.voi_jitter_mm >= 0, where, "augment.voi_jitter_mm must be >= 0")
    _check(d.sampling in SAMPLINGS, where, f"data.sampling must be one of {SAMPLINGS}")
    _check(0.0 <= d.lesion_patch_fraction <= 1.0, where,
           "data.lesion_patch_fraction must be in [0, 1]")
    _check(0.0 <= d.cls_min_lesion_fraction <= 1.0, where,
           "data.cls_min_lesion_fraction must be in [0, 1]")
    for name in ("hu_offset", "hu_noise_max", "blur_sigma_max_mm", "sharpen_max",
                 "slice_thickness_max_mm"):
        _check(getattr(a, name) >= 0, where, f"augment.{name} must be >= 0")
    _check(0.0 <= a.hu_scale_fraction < 1.0, where, "augment.hu_scale_fraction must be in [0, 1)")
    _check(0.0 <= a.background_fraction < 1.0, where,
           "augment.background_fraction must be in [0, 1)")
    if isinstance(t.alpha, str):
        _check(t.alpha == "auto", where, "train.alpha must be a number in [0, 1] or 'auto'")
    else:
        _check(0.0 <= t.alpha <= 1.0, where, "train.alpha must be in [0, 1]")
    _check(t.learning_rate > 0, where, "train.learning_rate must be > 0")
    _check(0.0 <= t.lr_decay_per_epoch < 1.0, where, "train.lr_decay_per_epoch must be in [0, 1)")
    _check(0.0 <= t.ema_decay < 1.0, where, "train.ema_decay must be in [0, 1)")
    _check(t.grad_clip_norm >= 0.0, where, "train.grad_clip_norm must be >= 0")
    _check(t.checkpoint_tasks in CHECKPOINT_TASKS, where,
           f"train.checkpoint_tasks must be one of {list(CHECKPOINT_TASKS)}, "
           f"got {t.checkpoint_tasks!r}")
    _check(t.epochs >= 1, where, "train.epochs must be >= 1")
    _check(0 <= t.warmup_epochs < t.epochs, where, "train.warmup_epochs must be in [0, epochs)")
    _check(t.batch_size >= 1, where, "train.batch_size must be >= 1")
    _check(t.num_folds >= 2, where, "train.num_folds must be >= 2")
    _check(0.0 <= t.inner_val_fraction < 0.5, where, "train.inner_val_fraction must be in [0, 0.5)")
    _check(0.0 < t.threshold < 1.0, where, "train.threshold must be in (0, 1)")
    _check(t.seg_bce_weight >= 0, where, "train.seg_bce_weight must be >= 0")
    _check(t.patches_per_subject >= 1, where, "train.patches_per_subject must be >= 1")
    _check(0.0 <= t.val_overlap < 1.0, where, "train.val_overlap must be in [0, 1)")
    _check(all(v > 0 for v in t.postprocess_min_ml), where,
           "train.postprocess_min_ml values must be > 0")
    _check(all(0.0 < v < 1.0 for v in t.postprocess_thresholds), where,
           "train.postprocess_thresholds values must be in (0, 1)")
    _check(t.postprocess_max_hu >= 0, where, "train.postprocess_max_hu must be >= 0 (0 = off)")
    _check(t.postprocess_select in POSTPROCESS_SELECT, where,
           f"train.postprocess_select must be one of {list(POSTPROCESS_SELECT)}, "
           f"got {t.postprocess_select!r}")
    _check(t.workers >= 0 and t.prefetch >= 0, where,
           "train.workers and train.prefetch must be >= 0")
    _check(t.auto_weight_lr >= 0, where, "train.auto_weight_lr must be >= 0")
    _check(t.calibration_bins >= 1, where, "train.calibration_bins must be >= 1")
    _check(t.calibration in CALIBRATIONS, where,
           f"train.calibration must be one of {', '.join(CALIBRATIONS)}")
    _check(t.log_var_min < t.log_var_max, where, "train.log_var_min must be < train.log_var_max")
    _check(m.cls_pooling in CLS_POOLINGS, where,
           f"model.cls_pooling must be one of {', '.join(CLS_POOLINGS)}")
    _check(m.cls_rim_voxels >= 0, where, "model.cls_rim_voxels must be >= 0")
    _validate_descriptors(config.descriptors, where)
    _validate_inference(config.inference, where)


def _validate_inference(c: InferenceConfig, where: str) -> None:
    _check(c.window == 0 or (c.window >= 16 and c.window % 16 == 0), where,
           "inference.window must be 0 (the training VOI) or a positive multiple of 16")
    _check(0.0 <= c.overlap < 1.0, where, "inference.overlap must be in [0, 1)")
    _check(c.batch_size >= 0, where, "inference.batch_size must be >= 0 (0: automatic)")
    _check(c.tta in TTA_MODES, where, f"inference.tta must be one of {', '.join(TTA_MODES)}")
    _check(c.classifier in CLASSIFIERS, where,
           f"inference.classifier must be one of {', '.join(CLASSIFIERS)}")


def _validate_descriptors(c: DescriptorConfig, where: str) -> None:
    _check(c.rim_mm > 0, where, "descriptors.rim_mm must be > 0")
    _check(0 <= c.vessel_min_mm < c.vessel_max_mm, where,
           "descriptors.vessel_min_mm must be in [0, descriptors.vessel_max_mm)")
    _check(c.vessel_min_hu <= c.vessel_max_hu, where,
           "descriptors.vessel_min_hu must be <= descriptors.vessel_max_hu")
    _check(c.soft_min_hu < c.soft_max_hu, where,
           "descriptors.soft_min_hu must be < descriptors.soft_max_hu")
    _check(c.core_mm >= 0, where, "descriptors.core_mm must be >= 0")
    _check(0 <= c.parenchyma_gap_mm < c.noise_shell_mm, where,
           "descriptors.parenchyma_gap_mm must be in [0, descriptors.noise_shell_mm)")
    _check(c.l2_penalty >= 0, where, "descriptors.l2_penalty must be >= 0")


def _validate_strip(d: DataConfig, where: str) -> None:
    """The skull-stripping fields: HU thresholds in order, margins >= 0 mm."""
    for name in ("strip_bone_closing_mm", "strip_rim_mm", "strip_smooth_mm", "strip_core_mm",
                 "strip_protect_mm", "strip_rim_grow_mm"):
        _check(getattr(d, name) >= 0, where, f"data.{name} must be >= 0 (mm)")
    below = (("strip_brain_min_hu", "strip_hematoma_min_hu"),
             ("strip_hematoma_min_hu", "strip_bone_like_hu"),
             ("strip_hematoma_min_hu", "strip_hematoma_max_hu"),
             ("strip_bone_like_hu", "strip_bone_hu"), ("strip_hematoma_max_hu", "strip_bone_hu"),
             ("strip_bone_hu", "strip_rim_max_hu"))
    for low, high in below:
        _check(getattr(d, low) < getattr(d, high), where,
               f"data.{high} must be above data.{low} (HU)")


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts."""
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """Serialise a config as TOML that :func:`load` reads back to an equal config."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return repr(value)
