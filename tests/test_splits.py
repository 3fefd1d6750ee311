"""Stratified folds, inner validation from training folds only, saved and reused splits."""

import json

import pytest

from mlssp_jax import splits
from mlssp_jax.errors import InputError

IDS = [f"s{i:02d}" for i in range(23)]
LABELS = [1 if i % 2 else 0 for i in range(23)]  # 11 positives, 12 negatives


def test_folds_stratified_disjoint_and_deterministic():
    folds = splits.make_folds(IDS, LABELS, 5, seed=0)
    assert sorted(s for f in folds for s in f) == sorted(IDS)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    label = dict(zip(IDS, LABELS, strict=True))
    for fold in folds:
        assert sum(label[s] for s in fold) in (2, 3)
    shuffled = list(zip(IDS, LABELS, strict=True))[::-1]
    again = splits.make_folds([s for s, _ in shuffled], [y for _, y in shuffled], 5, seed=0)
    assert again == folds
    assert splits.make_folds(IDS, LABELS, 5, seed=1) != folds


def test_fold_split_val_from_training_only():
    label = dict(zip(IDS, LABELS, strict=True))
    tests = []
    for fold in range(5):
        split = splits.fold_split(IDS, LABELS, fold, 5, inner_val_fraction=0.15, seed=0)
        train, val, test = map(set, (split["train"], split["val"], split["test"]))
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(IDS)
        assert {label[s] for s in val} == {0, 1}
        tests.append(test)
    assert set().union(*tests) == set(IDS)
    assert splits.fold_split(IDS, LABELS, 0, 5, 0.0, seed=0)["val"] == []


def test_too_few_of_a_class():
    with pytest.raises(InputError, match="class 1"):
        splits.make_folds(IDS[:6], [0, 0, 0, 0, 0, 1], 5, seed=0)


def test_load_or_create_reuses_and_refuses(tmp_path):
    first = splits.load_or_create(tmp_path, IDS, LABELS, 5, 0.15, seed=0)
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["folds"] == first
    # a tampered saved file proves it is read back, not recomputed
    saved["folds"][0]["val"] = ["marker"]
    (tmp_path / "splits.json").write_text(json.dumps(saved))
    assert splits.load_or_create(tmp_path, IDS, LABELS, 5, 0.15, seed=0)[0]["val"] == ["marker"]
    with pytest.raises(InputError, match="splits.json"):
        splits.load_or_create(tmp_path, IDS[:-1], LABELS[:-1], 5, 0.15, seed=0)
