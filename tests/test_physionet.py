"""The PhysioNet CT-ICH adapter, on a tiny replica of the dataset's layout."""

from __future__ import annotations

import csv
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mlssp_jax import manifest, nifti, physionet
from mlssp_jax.errors import InputError

COLUMNS = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal",
           "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
# patient -> per-slice subtype sets (3 slices); 51 has no hemorrhage
PATIENTS = {49: [set(), {"Intraparenchymal"}, set()],
            50: [{"Subdural"}, set(), set()],
            51: [set(), set(), set()],
            52: [set(), {"Intraparenchymal", "Subarachnoid"}, {"Subarachnoid"}]}
AFFINE = np.diag([-0.5, 0.5, 5.0, 1.0])


def _write_replica(root):
    """``root/ct_scans/NNN.nii``, ``root/masks/NNN.nii`` (0/255) and the diagnosis CSV."""
    rows = []
    for patient, slices in PATIENTS.items():
        hu = np.full((10, 10, 3), -1024, dtype=np.int16)
        hu[2:8, 2:8, :] = 35
        hu[1, 1, :] = 1500
        mask = np.zeros((10, 10, 3), dtype=np.uint8)
        for k, subtypes in enumerate(slices):
            if subtypes:
                hu[4:6, 4:6, k] = 70
                mask[4:6, 4:6, k] = 255
            flags = [int(name in subtypes) for name in COLUMNS[2:7]]
            rows.append([patient, k + 1, *flags, int(not subtypes), 0])
        nib.save(nib.Nifti1Image(hu, AFFINE), root / "ct_scans" / f"{patient:03d}.nii")
        nib.save(nib.Nifti1Image(mask, AFFINE), root / "masks" / f"{patient:03d}.nii")
    with open(root / physionet.DIAGNOSIS_CSV, "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])


@pytest.fixture
def replica(tmp_path):
    root = tmp_path / "ct-ich"
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    _write_replica(root)
    return root


def test_manifest_from_the_dataset(replica, tmp_path):
    out = tmp_path / "out" / "ich.csv"
    assert physionet.main(["--root", str(replica), "--out", str(out),
                           "--positive", "Intraparenchymal"]) == 0
    subjects = manifest.read_manifest(out)
    assert {s.subject_id: s.label for s in subjects} == {"049": 1, "050": 0, "052": 1}
    manifest.check_subjects(subjects)  # binarised masks pass the 0/1 and grid checks
    mask = nifti.load_mask(subjects[0].mask, like=nifti.load_image(subjects[0].image))
    assert mask.data.sum() == 4
    assert subjects[0].image == (replica / "ct_scans" / "049.nii").resolve()


def test_several_positive_subtypes_and_keeping_negatives(replica, tmp_path):
    out = physionet.build_manifest(replica, tmp_path / "m.csv",
                                   physionet.parse_positive("subdural, Subarachnoid"),
                                   keep_negative=True)
    with pytest.raises(InputError, match=r"line 4: mask is empty"):
        manifest.read_manifest(out)
    subjects = manifest.read_manifest(out, require_masks=False)
    labels = {s.subject_id: s.label for s in subjects}
    assert labels == {"049": 0, "050": 1, "051": 0, "052": 1}
    assert [s.subject_id for s in subjects if s.mask is None] == ["051"]


def test_unknown_subtype_on_the_command_line(replica, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlssp_jax.physionet", "--root", str(replica),
                           "--out", str(tmp_path / "m.csv"), "--positive", "Parenchymal"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --positive: unknown subtype Parenchymal (choose from Intraventricular, "
        "Intraparenchymal, Subarachnoid, Epidural, Subdural)"]
    assert not (tmp_path / "m.csv").exists()


def test_missing_mask_file(replica, tmp_path):
    (replica / "masks" / "050.nii").unlink()
    with pytest.raises(InputError, match=r"masks/050\.nii: no such file \(patient 50"):
        physionet.build_manifest(replica, tmp_path / "m.csv", ("Intraparenchymal",))
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "m_masks").exists()


def test_mask_on_another_grid(replica, tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 4), np.uint8), AFFINE), replica / "masks/052.nii")
    with pytest.raises(InputError, match=r"052\.nii: mask shape \(10, 10, 4\) does not match"):
        physionet.build_manifest(replica, tmp_path / "m.csv", ("Intraparenchymal",))


def test_diagnosis_csv_without_a_subtype_column(replica, tmp_path):
    path = replica / physionet.DIAGNOSIS_CSV
    path.write_text(path.read_text().replace("Epidural", "Extradural"))
    with pytest.raises(InputError, match=r"diagnosis_raw_ct\.csv: missing columns Epidural"):
        physionet.build_manifest(replica, tmp_path / "m.csv", ("Intraparenchymal",))
