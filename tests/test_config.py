"""Config: TOML round trip, overrides, and refusal of typos, wrong types and bad ranges."""

import pytest

from mlssp_jax import config
from mlssp_jax.errors import InputError


def test_defaults_are_the_paper():
    c = config.Config()
    assert c.data.voi_size == 64
    assert c.train.alpha == 0.4
    assert c.train.learning_rate == 1e-5
    assert c.train.lr_decay_per_epoch == 0.05
    assert (c.train.adam_b1, c.train.adam_b2) == (0.9, 0.999)
    assert c.augment.background_fraction == 0.0  # VOIs always on the lesion


def test_toml_round_trip(tmp_path):
    c = config.apply_overrides(config.Config(), ["model.width=8", 'train.alpha="auto"',
                                                 'data.manifest="a \\"b\\".csv"',
                                                 "descriptors.rim_mm=3.0",
                                                 'model.cls_pooling="lesion"',
                                                 "inference.overlap=0.5",
                                                 'inference.tta="flips"'])
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(c))
    assert config.load(path) == c


def test_overrides_parse_types():
    c = config.apply_overrides(config.Config(), ["train.learning_rate=1e-3", "augment.elastic=true",
                                                 "model.name=ynet"])
    assert c.train.learning_rate == 1e-3
    assert c.augment.elastic is True
    assert c.model.name == "ynet"


def test_int_accepted_for_float():
    c = config.from_dict({"train": {"alpha": 1}})
    assert c.train.alpha == 1.0 and isinstance(c.train.alpha, float)


@pytest.mark.parametrize("raw, message", [
    ({"train": {"alpah": 0.4}}, "unknown key 'train.alpah'"),
    ({"trian": {}}, "unknown section 'trian'"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected int"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected int"),
    ({"model": {"remat": 1}}, "model.remat: expected bool"),
    ({"train": {"alpha": 1.5}}, "train.alpha must be in [0, 1]"),
    ({"train": {"alpha": "sometimes"}}, "'auto'"),
    ({"model": {"name": "resnet"}}, "model.name must be one of"),
    ({"data": {"voi_size": 40}}, "multiple of 16"),
    ({"augment": {"background_fraction": 1.0}}, "augment.background_fraction must be in [0, 1)"),
    ({"augment": {"background_fraction": -0.1}}, "augment.background_fraction must be in [0, 1)"),
    ({"train": {"auto_weight_lr": -1e-3}}, "train.auto_weight_lr must be >= 0"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay must be in [0, 1)"),
    ({"train": {"warmup_epochs": 100}}, "train.warmup_epochs must be in [0, epochs)"),
    ({"train": {"grad_clip_norm": -1.0}}, "train.grad_clip_norm must be >= 0"),
    ({"train": {"checkpoint_tasks": "dsc"}}, "train.checkpoint_tasks must be one of"),
    ({"train": {"postprocess_select": "median"}}, "train.postprocess_select must be one of"),
    ({"train": {"log_var_min": 2.0, "log_var_max": 1.0}}, "train.log_var_min must be <"),
    ({"train": {"calibration_bins": 0}}, "train.calibration_bins must be >= 1"),
    ({"model": {"cls_pooling": "max"}}, "model.cls_pooling must be one of global, lesion"),
    ({"model": {"cls_rim_voxels": -1}}, "model.cls_rim_voxels must be >= 0"),
    ({"descriptors": {"rim_mm": 0.0}}, "descriptors.rim_mm must be > 0"),
    ({"descriptors": {"vessel_min_mm": 20.0}}, "descriptors.vessel_min_mm must be in"),
    ({"descriptors": {"vessel_min_hu": 95.0}}, "descriptors.vessel_min_hu must be <="),
    ({"descriptors": {"l2_penalty": -1.0}}, "descriptors.l2_penalty must be >= 0"),
    ({"descriptors": {"soft_min_hu": 100.0}}, "descriptors.soft_min_hu must be <"),
    ({"descriptors": {"core_mm": -1.0}}, "descriptors.core_mm must be >= 0"),
    ({"descriptors": {"parenchyma_gap_mm": 20.0}}, "descriptors.parenchyma_gap_mm must be in"),
    ({"descriptors": {"rim": 4.0}}, "unknown key 'descriptors.rim'"),
    ({"inference": {"window": 40}}, "inference.window must be 0 (the training VOI) or"),
    ({"inference": {"window": -16}}, "inference.window must be 0"),
    ({"inference": {"overlap": 1.0}}, "inference.overlap must be in [0, 1)"),
    ({"inference": {"overlap": -0.1}}, "inference.overlap must be in [0, 1)"),
    ({"inference": {"batch_size": -1}}, "inference.batch_size must be >= 0"),
    ({"inference": {"tta": "rotations"}}, "inference.tta must be one of none, flips, all"),
    ({"inference": {"classifier": "forest"}},
     "inference.classifier must be one of cnn, descriptors"),
    ({"inference": {"gaussian": "yes"}}, "inference.gaussian: expected bool"),
])
def test_bad_values_are_input_errors(raw, message):
    with pytest.raises(InputError, match=None) as err:
        config.from_dict(raw, where="x.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("x.toml")


def test_bad_override_syntax():
    with pytest.raises(InputError, match="section.key=value"):
        config.apply_overrides(config.Config(), ["epochs=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nalpha = ")
    with pytest.raises(InputError, match="not valid TOML"):
        config.load(bad)


def test_a_run_saved_with_temperature_scaling_still_loads():
    """config.toml of runs trained before train.calibration existed."""
    old_on = config.from_dict({"train": {"temperature_scaling": True}})
    old_off = config.from_dict({"train": {"temperature_scaling": False}})
    assert (old_on.train.calibration, old_off.train.calibration) == ("temperature", "none")
