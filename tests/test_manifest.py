"""Manifest reading and validation: a test per bad case, and the --check command."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlssp_jax import manifest, nifti
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError
from mlssp_jax.manifest import Subject, check_folds, read_manifest
from mlssp_jax.preprocess import resolve_data

HEADER = "subject_id,image,mask,label\n"


@pytest.fixture
def scans(tmp_path):
    """Two tiny scans with masks in ``tmp_path/data``; returns the folder."""
    data = tmp_path / "data"
    hu = np.full((8, 8, 3), -1000.0, dtype=np.float32)
    hu[2:6, 2:6, :] = 40.0
    hu[0, 0, 0] = 1000.0
    lesion = np.zeros((8, 8, 3), dtype=np.uint8)
    lesion[3:5, 3:5, 1] = 1
    for name in ("a", "b"):
        nifti.save(data / f"{name}.nii.gz", hu, np.eye(4))
        nifti.save(data / f"{name}_mask.nii.gz", lesion, np.eye(4))
    return data


def _write(folder, rows: str, header: str = HEADER):
    path = folder / "manifest.csv"
    path.write_text(header + rows)
    return path


def test_reads_subjects_with_paths_relative_to_the_manifest(scans, tmp_path, monkeypatch):
    path = _write(scans, "a,a.nii.gz,a_mask.nii.gz,1\nb,b.nii.gz,b_mask.nii.gz,0\n")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    subjects = read_manifest(path)
    assert subjects == [
        Subject("a", scans / "a.nii.gz", scans / "a_mask.nii.gz", 1),
        Subject("b", scans / "b.nii.gz", scans / "b_mask.nii.gz", 0)]
    manifest.check_subjects(subjects)


def test_missing_manifest(tmp_path):
    with pytest.raises(InputError, match=r"nowhere\.csv: no such manifest file"):
        read_manifest(tmp_path / "nowhere.csv")


def test_unreadable_manifest(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(InputError, match=r"manifest\.csv: cannot read the manifest"):
        read_manifest(path)


def test_bad_header(scans):
    path = _write(scans, "a,a.nii.gz,1\n", header="subject_id,image,label\n")
    with pytest.raises(InputError, match=r"manifest\.csv: header must be .* missing mask"):
        read_manifest(path)


def test_empty_manifest(scans):
    with pytest.raises(InputError, match=r"manifest\.csv: the manifest lists no subjects"):
        read_manifest(_write(scans, ""))


def test_wrong_number_of_fields(scans):
    path = _write(scans, "a,a.nii.gz,a_mask.nii.gz,1,extra\n")
    with pytest.raises(InputError, match=r"manifest\.csv: line 2: expected 4 fields"):
        read_manifest(path)


def test_duplicate_subject_ids(scans):
    path = _write(scans, "a,a.nii.gz,a_mask.nii.gz,1\na,b.nii.gz,b_mask.nii.gz,0\n")
    with pytest.raises(InputError, match=r"line 3: duplicate subject_id 'a' \(first on line 2\)"):
        read_manifest(path)


@pytest.mark.parametrize("label", ["2", "yes", "", "0.5"])
def test_bad_label(scans, label):
    path = _write(scans, f"a,a.nii.gz,a_mask.nii.gz,{label}\n")
    with pytest.raises(InputError, match=rf"line 2: label must be 0 or 1, got '{label}'"):
        read_manifest(path)


def test_missing_image_file(scans):
    path = _write(scans, "a,gone.nii.gz,a_mask.nii.gz,1\n")
    with pytest.raises(InputError, match=r"line 2: image file .*gone\.nii\.gz does not exist"):
        read_manifest(path)


def test_mask_required_unless_told_otherwise(scans):
    path = _write(scans, "a,a.nii.gz,,\n")
    with pytest.raises(InputError, match=r"line 2: mask is empty"):
        read_manifest(path)
    (subject,) = read_manifest(path, require_masks=False, require_labels=False)
    assert subject.mask is None and subject.label is None


def test_check_subjects_opens_every_file(scans):
    bad = np.zeros((8, 8, 3), dtype=np.uint8)
    bad[1, 1, 1] = 255
    nifti.save(scans / "b_mask.nii.gz", bad, np.eye(4))
    subjects = read_manifest(_write(scans, "a,a.nii.gz,a_mask.nii.gz,1\n"
                                           "b,b.nii.gz,b_mask.nii.gz,0\n"))
    with pytest.raises(InputError, match=r"b_mask\.nii\.gz: mask values must be 0 or 1"):
        manifest.check_subjects(subjects)


def test_too_few_subjects_of_a_class_for_the_folds(tiny_cohort):
    subjects = read_manifest(tiny_cohort)
    check_folds(subjects, 5)
    with pytest.raises(InputError, match=r"data\.csv: only 5 subjects with label 0 \(other\); "
                                         r"6-fold cross-validation"):
        check_folds(subjects, 6, where="data.csv")


def test_resolve_data(scans, tmp_path, monkeypatch):
    path = _write(scans, "a,a.nii.gz,a_mask.nii.gz,1\n")
    assert resolve_data(DataConfig(manifest=str(path))) == path
    with pytest.raises(InputError, match=r"missing\.csv: no such manifest file"):
        resolve_data(DataConfig(manifest=str(tmp_path / "missing.csv")))
    monkeypatch.setenv("MLSSP_JAX_CACHE", str(tmp_path / "cache"))
    default = resolve_data(DataConfig(synth_subjects=2, synth_avm=1, synth_small=True))
    assert default.is_relative_to(tmp_path / "cache") and len(read_manifest(default)) == 2


def _check(*args):
    return subprocess.run([sys.executable, "-m", "mlssp_jax.manifest", "--check", *args],
                          capture_output=True, text=True, timeout=120)


def test_check_command(tiny_cohort, tmp_path):
    ok = _check(str(tiny_cohort), "--folds", "5")
    assert ok.returncode == 0, ok.stderr
    assert "OK, 10 subjects (5 AVM, 5 other)" in ok.stdout
    copy = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, copy)
    (copy / "images" / "sub-003.nii.gz").unlink()
    bad = _check(str(copy / "manifest.csv"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"error: {copy / 'manifest.csv'}: line 4: image file "
        f"{copy / 'images' / 'sub-003.nii.gz'} does not exist"]
    too_few = _check(str(tiny_cohort), "--folds", "6")
    assert too_few.returncode == 2 and len(too_few.stderr.splitlines()) == 1
