"""DICOM series in: a synthetic volume written as a CT series with pydicom (oblique, LPS,
gantry tilt, shuffled file names, slope/intercept) reads back to the same HU at the same world
positions; bad series are refused naming the folder or file; the manifest and predict take
series folders (predict end to end on the session's tiny run, conftest.py ``tiny_run``)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import matplotlib.image
import numpy as np
import pydicom
import pytest
from helpers import rotation_about

from mlssp_jax import config, dicom, manifest, nifti, overlay, predict, preprocess, scans
from mlssp_jax.cli import run_command
from mlssp_jax.dicom_export import write_series
from mlssp_jax.errors import InputError


def oblique_affine(flip_slices=False, tilt_mm=0.0):
    """An LPS-like voxel order (i -> left, j -> posterior), 20 degrees about x and 10 about z,
    0.7 x 0.6 x 3 mm; ``tilt_mm`` shears each slice step along j (a gantry tilt)."""
    affine = np.eye(4)
    spacing = np.diag([-0.7, -0.6, -3.0 if flip_slices else 3.0])
    affine[:3, :3] = rotation_about(2, 10) @ rotation_about(0, 20) @ spacing
    affine[:3, 2] += tilt_mm * affine[:3, 1] / 0.6
    affine[:3, 3] = [40.0, 30.0, -20.0]
    return affine


def hu_volume(shape=(9, 7, 6), seed=0):
    """Random HU on the 0.5 HU grid that slope 0.5 / intercept -1024 stores exactly."""
    return np.random.default_rng(seed).integers(-2048, 4000, shape).astype(np.float32) / 2


def same_world_values(read: nifti.Volume, data: np.ndarray, affine: np.ndarray):
    """Each voxel centre of ``read`` falls on a voxel centre of (data, affine) with its value."""
    index = np.indices(read.data.shape).reshape(3, -1)
    world = read.affine @ np.vstack([index, np.ones(index.shape[1])])
    source = (np.linalg.inv(affine) @ world)[:3]
    np.testing.assert_allclose(source, np.round(source), atol=1e-4)
    source = np.round(source).astype(int)
    np.testing.assert_array_equal(read.data.reshape(-1), data[tuple(source)])


@pytest.mark.parametrize("flip_slices, tilt_mm", [(False, 0.0), (True, 0.0), (False, 1.2)])
def test_series_reads_back_to_the_same_hu_at_the_same_world_positions(tmp_path, flip_slices,
                                                                       tilt_mm):
    data, affine = hu_volume(), oblique_affine(flip_slices, tilt_mm)
    write_series(data, affine, tmp_path / "s", slope=0.5, intercept=-1024.0, shuffle_seed=3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) != [
        f.name for f in sorted((tmp_path / "s").iterdir(), key=lambda f: pydicom.dcmread(
            f).InstanceNumber)]  # file names are not in slice order
    (tmp_path / "s" / "README.txt").write_text("not DICOM: skipped")
    read = scans.load_scan(tmp_path / "s")
    assert read.data.dtype == np.float32 and read.data.shape == data.shape
    same_world_values(read, data, affine)
    if not flip_slices:  # the writer's order is the reader's: the very same grid
        np.testing.assert_allclose(read.affine, affine, atol=1e-5)


def series(tmp_path, name="s", **kw):
    write_series(hu_volume(), oblique_affine(), tmp_path / name, **kw)
    return tmp_path / name


def by_instance(folder):
    return sorted(folder.glob("*.dcm"), key=lambda f: pydicom.dcmread(f).InstanceNumber)


def break_missing(folder, tmp_path):
    by_instance(folder)[2].unlink()


def break_duplicate(folder, tmp_path):
    ds = pydicom.dcmread(by_instance(folder)[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "copy.dcm")


def break_two_series(folder, tmp_path):
    other = series(tmp_path, "other", description="bone kernel")
    for f in other.iterdir():
        shutil.move(f, folder / f"b_{f.name}")


def break_modality(folder, tmp_path):
    ds = pydicom.dcmread(by_instance(folder)[0])
    ds.Modality = "MR"
    ds.save_as(by_instance(folder)[0])


def break_spacing(folder, tmp_path):
    path = by_instance(folder)[-1]
    ds = pydicom.dcmread(path)
    normal = np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3)))
    ds.ImagePositionPatient = (np.asarray(ds.ImagePositionPatient) + 0.6 * normal).tolist()
    ds.save_as(path)


def break_empty(folder, tmp_path):
    for f in folder.iterdir():
        f.unlink()


@pytest.mark.parametrize("damage, message", [
    (break_missing, "missing slice"), (break_duplicate, "two slices at one position"),
    (break_two_series, "holds 2 series"), (break_modality, "not a CT image"),
    (break_spacing, "non-uniform slice spacing"), (break_empty, "no DICOM CT image")])
def test_bad_series_are_refused_naming_the_folder_or_file(tmp_path, damage, message):
    folder = series(tmp_path)
    damage(folder, tmp_path)
    with pytest.raises(InputError, match=message) as err:
        dicom.read_series(folder)
    assert str(folder) in str(err.value) or folder.name in str(err.value)


def test_folders_are_series_or_hold_nifti_files(tmp_path):
    folder = series(tmp_path)
    nifti.save(tmp_path / "niftis" / "a.nii.gz", hu_volume(), np.eye(4))
    (tmp_path / "empty").mkdir()
    assert scans.scan_paths([folder, tmp_path / "niftis"]) == [folder,
                                                               tmp_path / "niftis" / "a.nii.gz"]
    assert scans.scan_name(folder) == "s"
    with pytest.raises(InputError, match="no DICOM file"):
        scans.scan_paths([tmp_path / "empty"])
    with pytest.raises(InputError, match="must hold a DICOM series"):
        scans.load_scan(tmp_path / "niftis")
    nifti.save(tmp_path / "s.nii", hu_volume(), np.eye(4))
    with pytest.raises(InputError, match="same output name 's'"):
        scans.scan_paths([folder, tmp_path / "s.nii"])


def test_preprocessing_cache_key_follows_the_series_files(tmp_path):
    folder = series(tmp_path)
    subject = manifest.Subject("a", folder, None, 1)
    key = preprocess.subject_cache_key(subject, config.Config().data)
    os.utime(by_instance(folder)[3], ns=(1, 1))
    assert preprocess.subject_cache_key(subject, config.Config().data) != key


def test_manifest_image_may_be_a_series_folder(tmp_path):
    folder = series(tmp_path)
    image = scans.load_scan(folder)
    nifti.save(tmp_path / "mask.nii.gz", (image.data > 500).astype(np.uint8), image.affine)
    (tmp_path / "m.csv").write_text("subject_id,image,mask,label\na,s,mask.nii.gz,1\n")
    subjects = manifest.read_manifest(tmp_path / "m.csv")
    assert subjects[0].image == folder.resolve()
    manifest.check_subjects(subjects)
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("subject_id,image,mask,label\na,empty,mask.nii.gz,1\n")
    with pytest.raises(InputError, match="line 2: image folder .* holds no DICOM series"):
        manifest.read_manifest(tmp_path / "m.csv")


@pytest.fixture(scope="module")
def series_and_nifti(tiny_cohort, tmp_path_factory):
    """A tiny-cohort scan and the same scan as a shuffled DICOM series (slope 1, int. -1024)."""
    scan = manifest.read_manifest(tiny_cohort)[0].image
    image = nifti.load_image(scan)
    folder = tmp_path_factory.mktemp("dicom") / "series-a"
    write_series(image.data, image.affine, folder, shuffle_seed=0)
    return scan, folder


def test_predict_on_the_series_matches_predict_on_its_nifti(tiny_run, series_and_nifti,
                                                            tmp_path):
    scan, folder = series_and_nifti
    argv = ["--workdir", str(tiny_run), "--image", str(scan), str(folder), "--out",
            str(tmp_path / "out"), "--batch-size", "16", "--overlap", "0", "--dicom-seg"]
    assert run_command(predict.main, argv) == 0
    out = tmp_path / "out"
    name = scans.scan_name(scan)
    assert sorted(p.name for p in out.glob("*_seg.dcm")) == ["series-a_seg.dcm"]  # series only
    masks = [nifti.read_volume(out / f"{n}_mask.nii.gz") for n in (name, "series-a")]
    same_world_values(masks[1], masks[0].data, masks[0].affine)
    records = [json.loads((out / f"{n}.json").read_text()) for n in (name, "series-a")]
    assert records[1]["volume_ml"] == pytest.approx(records[0]["volume_ml"], rel=1e-6)
    # the series stores positions to 1e-6 mm, so derived sizes agree to rounding
    assert records[1]["abc2_ml"] == pytest.approx(records[0]["abc2_ml"], rel=1e-6)
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "image", "volume_ml", "abc2_ml", "avm_probability",
                             "label", "cnn_avm_probability", "descriptor_avm_probability",
                             "folds", "seconds"]
    assert [r["name"] for r in rows] == [name, "series-a"] and rows[1]["image"] == str(folder)
    assert float(rows[1]["volume_ml"]) == pytest.approx(records[1]["volume_ml"], abs=1e-4)
    assert rows[1]["folds"] == "0" and float(rows[1]["seconds"]) > 0
    width, height = overlay.figure_size_px()
    for n in (name, "series-a"):
        assert matplotlib.image.imread(out / f"{n}_overlay.png").shape[:2] == (height, width)


@pytest.mark.parametrize("damage, message", [
    (break_missing, "missing slice"), (break_two_series, "holds 2 series"),
    (break_modality, "not a CT image"), (break_empty, "no DICOM file")])
def test_predict_refuses_a_bad_series_and_writes_nothing(tiny_run, tmp_path, capsys, damage,
                                                         message):
    folder = series(tmp_path)
    damage(folder, tmp_path)
    good = series(tmp_path, "good")  # given first: still nothing is written
    argv = ["--workdir", str(tiny_run), "--image", str(good), str(folder), "--out",
            str(tmp_path / "o")]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err and str(folder) in err
    assert not (tmp_path / "o").exists()


def test_dicom_seg_frames_land_on_the_mask_in_world_space(tmp_path):
    import highdicom as hd

    from mlssp_jax import dicom_seg

    folder = series(tmp_path, shuffle_seed=1)
    for path in folder.iterdir():  # exports often omit type 2 attributes
        ds = pydicom.dcmread(path)
        del ds.PatientBirthDate, ds.StudyDate
        ds.save_as(path)
    image = scans.load_scan(folder)
    mask = np.zeros(image.data.shape, np.uint8)
    mask[2:6, 1:5, 1:4] = 1
    dicom_seg.write_seg(tmp_path / "seg.dcm", mask, folder)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    source_uid = pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    volume = seg.get_volume(combine_segments=True)  # (slice, row, column), LPS affine
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    hits = np.argwhere(volume.array > 0).T
    world = lps_to_ras @ volume.affine @ np.vstack([hits, np.ones(hits.shape[1])])
    index = np.round(np.linalg.inv(image.affine) @ world)[:3].astype(int)
    assert hits.shape[1] == mask.sum() and mask[tuple(index)].all()


def test_preprocessing_a_series_gives_what_its_nifti_gives(series_and_nifti, tmp_path):
    """Training can start from DICOM: the manifest's image may be the series folder."""
    scan, folder = series_and_nifti
    subjects = [manifest.Subject("nifti", scan, None, 1), manifest.Subject("dicom", folder,
                                                                           None, 1)]
    paths = preprocess.preprocess_cohort(subjects, tmp_path, config.Config().data)
    with np.load(paths["nifti"]) as a, np.load(paths["dicom"]) as b:
        # positions stored to 1e-6 mm can flip a voxel that sits exactly on a threshold
        assert np.mean(b["brain"] != a["brain"]) <= 1e-5
        np.testing.assert_allclose(b["affine"], a["affine"], atol=1e-5)  # positions: 1e-6 mm
        both = (a["brain"] > 0) & (b["brain"] > 0)
        np.testing.assert_allclose(b["image"][both], a["image"][both], atol=1e-4)
