"""NIfTI reading/writing: round trips, determinism, and every bad file SPEC.md lists."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlssp_jax import nifti
from mlssp_jax.errors import InputError

LPS_TILTED = np.array([[-0.45, 0.0, 0.0, 60.0],
                       [0.0, -0.44, -0.78, 90.0],
                       [0.0, -0.08, 4.43, -40.0],
                       [0.0, 0.0, 0.0, 1.0]])


def _ct(shape=(12, 10, 4)) -> np.ndarray:
    """A float32 'scan' in HU: air with a brain-like block."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[3:9, 3:8, 1:3] = 35.0
    hu[5, 5, 2] = 1200.0
    return hu


@pytest.fixture
def image_path(tmp_path):
    stored = (_ct() + 1024).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nifti.save(path, stored, LPS_TILTED, slope=1.0, inter=-1024.0)
    return path


def test_int16_with_slope_and_intercept_reads_back_in_hu(image_path):
    volume = nifti.load_image(image_path)
    assert volume.data.dtype == np.float32 and volume.data.shape == (12, 10, 4)
    np.testing.assert_array_equal(volume.data, _ct())
    np.testing.assert_allclose(volume.affine, LPS_TILTED, atol=1e-4)
    assert nib.load(image_path).get_data_dtype() == np.int16
    np.testing.assert_allclose(volume.spacing_mm, [0.45, np.hypot(0.44, 0.08),
                                                   np.hypot(0.78, 4.43)], rtol=1e-5)


def test_gzip_output_is_byte_identical_across_writes(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    for path in (a, b):
        nifti.save(path, _ct(), LPS_TILTED)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"missing\.nii: no such file"):
        nifti.load_image(tmp_path / "missing.nii")


def test_not_a_nifti_file(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("subject_id,image\n")
    with pytest.raises(InputError, match=r"notes\.nii: not a readable NIfTI file"):
        nifti.load_image(path)


def test_other_image_format_is_refused(tmp_path):
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(_ct(), np.eye(4)), path)
    with pytest.raises(InputError, match=r"scan\.mgz: not a NIfTI image \(MGHImage\)"):
        nifti.load_image(path)


def test_truncated_gzip(tmp_path):
    noisy = np.random.default_rng(0).integers(-1000, 1000, (12, 10, 4)).astype(np.int16)
    whole = tmp_path / "whole.nii.gz"
    nifti.save(whole, noisy, np.eye(4))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: "):
        nifti.load_image(path)


def test_trailing_singleton_dimension_is_squeezed_with_a_warning(tmp_path, caplog):
    path = tmp_path / "four_d.nii"
    nifti.save(path, _ct()[..., None], np.eye(4))
    with caplog.at_level(logging.WARNING, logger="mlssp_jax.nifti"):
        volume = nifti.load_image(path)
    assert volume.data.shape == (12, 10, 4)
    assert "trailing singleton" in caplog.text


@pytest.mark.parametrize("shape", [(12, 10, 4, 2), (12, 10)])
def test_non_3d_image(tmp_path, shape):
    path = tmp_path / "bad_shape.nii"
    nifti.save(path, np.zeros(shape, dtype=np.float32) - 1000.0, np.eye(4))
    with pytest.raises(InputError, match=r"bad_shape\.nii: expected a 3-D image, got shape"):
        nifti.load_image(path)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad_value):
    data = _ct()
    data[0, 0, 0] = bad_value
    data[1, 0, 0] = bad_value
    path = tmp_path / "nan.nii"
    nifti.save(path, data, np.eye(4))
    with pytest.raises(InputError, match=r"nan\.nii: 2 voxels are NaN or infinite"):
        nifti.load_image(path)


def test_bad_header_singular_affine(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((12, 10, 4))
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0] * 4
    header["vox_offset"] = 352
    path = tmp_path / "flat.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + _ct().tobytes(order="F"))
    with pytest.raises(InputError, match=r"flat\.nii: bad header: .*singular affine"):
        nifti.load_image(path)


def test_bad_header_unsupported_data_type(tmp_path):
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(_ct().astype(np.complex64), np.eye(4)), path)
    with pytest.raises(InputError, match=r"complex\.nii: bad header: unsupported data type"):
        nifti.load_image(path)


def _mask(tmp_path, data, affine=LPS_TILTED, name="mask.nii.gz"):
    path = tmp_path / name
    nifti.save(path, data, affine)
    return path


def test_mask_loads_as_uint8_on_the_image_grid(tmp_path, image_path):
    image = nifti.load_image(image_path)
    data = (image.data > 0).astype(np.float32)  # float 0.0/1.0 masks are fine too
    mask = nifti.load_mask(_mask(tmp_path, data), like=image)
    assert mask.data.dtype == np.uint8 and mask.data.sum() == data.sum()
    np.testing.assert_array_equal(mask.affine, image.affine)


def test_mask_shape_mismatch(tmp_path, image_path):
    image = nifti.load_image(image_path)
    path = _mask(tmp_path, np.ones((12, 10, 5), dtype=np.uint8))
    with pytest.raises(InputError, match=r"mask\.nii\.gz: mask shape \(12, 10, 5\) does not "
                                         r"match image .*ct\.nii\.gz shape \(12, 10, 4\)"):
        nifti.load_mask(path, like=image)


def test_mask_affine_mismatch(tmp_path, image_path):
    image = nifti.load_image(image_path)
    shifted = LPS_TILTED.copy()
    shifted[0, 3] += 0.5
    path = _mask(tmp_path, np.ones((12, 10, 4), dtype=np.uint8), affine=shifted)
    with pytest.raises(InputError, match=r"mask\.nii\.gz: mask affine differs from image .*"
                                         r"largest difference 0\.5"):
        nifti.load_mask(path, like=image)


def test_mask_values_other_than_0_and_1(tmp_path, image_path):
    image = nifti.load_image(image_path)
    data = (image.data > 0).astype(np.uint8) * 255
    with pytest.raises(InputError, match=r"mask\.nii\.gz: mask values must be 0 or 1, found 255"):
        nifti.load_mask(_mask(tmp_path, data), like=image)


def test_empty_mask_is_refused_unless_allowed(tmp_path, image_path):
    image = nifti.load_image(image_path)
    path = _mask(tmp_path, np.zeros((12, 10, 4), dtype=np.uint8))
    with pytest.raises(InputError, match=r"mask\.nii\.gz: mask is empty"):
        nifti.load_mask(path, like=image)
    assert nifti.load_mask(path, like=image, require_lesion=False).data.sum() == 0


def test_voxel_volume_in_ml():
    affine = np.diag([0.5, 0.5, 4.0, 1.0])
    affine[:3, :3] = affine[:3, :3][[1, 0, 2]]  # axis order does not change the volume
    volume = nifti.Volume(np.zeros((2, 2, 2)), affine, Path("v.nii"))
    assert volume.voxel_volume_ml == pytest.approx(1e-3)
