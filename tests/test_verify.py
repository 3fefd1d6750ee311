"""Dataset integrity before any output: header checks of every subject, voxel checks per
subject, and a failing run that leaves its output folder (and the cache) as it was."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlssp_jax import manifest, preprocess, verify
from mlssp_jax.cli import run_command
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def copy_cohort(tiny_cohort: Path, dest: Path, n: int = 3) -> Path:
    """The first ``n`` subjects of the tiny cohort copied into ``dest``; its manifest."""
    (dest / "images").mkdir(parents=True)
    rows = ["subject_id,image,mask,label"]
    for s in manifest.read_manifest(tiny_cohort)[:n]:
        shutil.copy(s.image, dest / "images" / f"{s.subject_id}.nii.gz")
        shutil.copy(s.mask, dest / "images" / f"{s.subject_id}_mask.nii.gz")
        rows.append(f"{s.subject_id},images/{s.subject_id}.nii.gz,"
                    f"images/{s.subject_id}_mask.nii.gz,{s.label}")
    (dest / "manifest.csv").write_text("\n".join(rows) + "\n")
    return dest / "manifest.csv"


def put_nan(path: Path) -> None:
    """One NaN voxel in a scan: its header stays valid, only a voxel check finds it."""
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_headers_catch_a_grid_mismatch_without_reading_voxels(tiny_cohort, tmp_path):
    subjects = manifest.read_manifest(copy_cohort(tiny_cohort, tmp_path, n=2))
    mask = nib.load(str(subjects[1].mask))
    moved = mask.affine.copy()
    moved[1, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), moved), str(subjects[1].mask))
    with pytest.raises(InputError, match=rf"{subjects[1].mask}: mask affine differs"):
        verify.check_headers(subjects)


def test_a_truncated_uncompressed_file_is_caught_from_its_header(tiny_cohort, tmp_path):
    subject = manifest.read_manifest(tiny_cohort)[0]
    path = tmp_path / "scan.nii"
    nib.save(nib.load(str(subject.image)), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"scan.nii: truncated"):
        verify.check_scans([path])


def test_a_failing_subject_leaves_the_cache_as_it_was(tiny_cohort, tmp_path):
    manifest_path = copy_cohort(tiny_cohort, tmp_path / "data", n=3)
    subjects = manifest.read_manifest(manifest_path)
    out = tmp_path / "cache"
    preprocess.preprocess_cohort(subjects[:1], out, DataConfig())  # a good subject, cached
    before = snapshot(out)
    put_nan(subjects[2].image)  # the last subject fails after subject 2 was preprocessed
    with pytest.raises(InputError, match=rf"{subjects[2].image}: 1 voxels are NaN"):
        preprocess.preprocess_cohort(subjects, out, DataConfig())
    assert snapshot(out) == before  # cached file untouched, nothing new (no staging left)


def test_a_failed_write_midway_removes_this_runs_files(tiny_cohort, tmp_path, monkeypatch):
    subjects = manifest.read_manifest(copy_cohort(tiny_cohort, tmp_path / "data", n=3))
    out = tmp_path / "out"
    real = preprocess._preprocess_subject

    def disk_full_on_last(subject, out_path, data_cfg, key):
        if subject.subject_id == subjects[-1].subject_id:
            raise OSError(28, "No space left on device", str(out_path))
        return real(subject, out_path, data_cfg, key)

    monkeypatch.setattr(preprocess, "_preprocess_subject", disk_full_on_last)
    with pytest.raises(OSError):
        preprocess.preprocess_cohort(subjects, out, DataConfig())
    assert not out.exists()  # made by this run, so removed with everything in it


def test_traversal_id_writes_nothing_anywhere(tiny_cohort, tmp_path, capsys):
    manifest_path = copy_cohort(tiny_cohort, tmp_path, n=2)
    text = manifest_path.read_text().replace("\nsub-002,", "\n../escape,")
    manifest_path.write_text(text)
    before = snapshot(tmp_path)
    argv = ["--data", str(manifest_path), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert run_command(preprocess.main, argv) == 2
    assert "line 3: subject_id '../escape' starts with '.'" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_error_inside_the_loop_starts_a_line_and_leaves_nothing(tiny_cohort, tmp_path):
    """A subprocess with the progress bar running when the last subject fails."""
    manifest_path = copy_cohort(tiny_cohort, tmp_path / "data", n=3)
    put_nan(manifest.read_manifest(manifest_path)[2].image)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mlssp_jax.preprocess", "--data",
                           str(manifest_path), "--out", str(out), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert "preprocess:  67%" in done.stderr  # the bar was running: 2 of 3 subjects done
    errors = [line for line in done.stderr.split("\n") if line.startswith("error:")]
    assert len(errors) == 1 and "1 voxels are NaN or infinite" in errors[0]
    assert "Traceback" not in done.stderr and not out.exists()
