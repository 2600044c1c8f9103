"""DICOM in and out. The series are written by SimpleITK (GDCM), an ordinary DICOM writer that is not the
project's; the derived series the project writes are read back by SimpleITK too."""

from __future__ import annotations

import locale
import shutil
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import SMALL, run_module, train
from shards.format import read_manifest
from shards.preprocess import load_nifti
from shards.sources import list_source, load_ref
from train import rundir


def write_series(nifti: Path, folder: Path, patient: str, study: str, series: str, modality: str = "MR") -> None:
    """One file per slice, under random names in a nested folder, as scanners and PACS exports do."""
    image = sitk.ReadImage(str(nifti))
    d = image.GetDirection()
    tags = {"0010|0020": patient, "0010|0010": f"{patient}^Test", "0020|000d": study, "0020|000e": series, "0008|0060": modality,
            "0008|103e": f"{nifti.name[:-7]} acquired", "0020|0011": "3", "0008|0021": "20260101",
            "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    kept = locale.setlocale(locale.LC_ALL)
    try:
        _write_planes(image, folder, writer, tags, series)
    finally:  # GDCM's writer sets the C locale and leaves it: later subprocess output would decode as ASCII
        locale.setlocale(locale.LC_ALL, kept)


def _write_planes(image, folder, writer, tags, series) -> None:
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"{series}.{k + 1}")
        writer.SetFileName(str(folder / f"{uuid.uuid4().hex}.dcm"))
        writer.Execute(plane)


@pytest.fixture(scope="module")
def dicom_sources(ixi_tars, tmp_path_factory):
    """The fixture IXI as DICOM: t1/<patient>/<series>/<random>.dcm and likewise t2/, plus the NIfTI it came from."""
    root = tmp_path_factory.mktemp("dicom")
    for contrast in ("T1", "T2"):
        with tarfile.open(ixi_tars / f"IXI-{contrast}.tar") as tar:
            for member in tar.getmembers():
                nifti = root / "nifti" / member.name
                nifti.parent.mkdir(exist_ok=True)
                nifti.write_bytes(tar.extractfile(member).read())
                ident = member.name[3:6]
                write_series(nifti, root / contrast.lower() / f"PAT{ident}" / contrast, f"PAT{ident}", f"1.2.826.0.1.{int(ident)}",
                             f"1.2.826.0.1.{int(ident)}.{contrast[1]}")
    return root


def _only(refs, subject):
    return next(r for r in refs if r.subject == subject)


@pytest.mark.parametrize("contrast", ["t1", "t2"])  # sagittal and axial acquisitions
def test_a_series_loads_exactly_like_the_nifti_it_was_written_from(dicom_sources, contrast):
    refs, skipped = list_source(dicom_sources / contrast, contrast)
    assert skipped == [] and len(refs) == 9
    for nifti in sorted((dicom_sources / "nifti").glob(f"*-{contrast.upper()}.nii.gz"))[:3]:
        (data, affine, zooms), md5 = load_ref(_only(refs, f"PAT{nifti.name[3:6]}"))
        want, want_affine, want_zooms = load_nifti(nifti.read_bytes())
        np.testing.assert_array_equal(data, want)
        np.testing.assert_allclose(affine, want_affine, atol=1e-4)
        np.testing.assert_allclose(zooms, want_zooms, atol=1e-5)


@pytest.fixture(scope="module")
def dicom_run(dicom_sources, tmp_path_factory):
    """The DICOM sources packed and trained on for a few steps."""
    root = tmp_path_factory.mktemp("dicom-run")
    run_module("shards", "pack", "--t1", dicom_sources / "t1", "--t2", dicom_sources / "t2", "--out", root / "shards", "--size", 64,
               "--workers", 2)
    train("--data", root / "shards", "--out", root / "run", *SMALL, "--max_steps", 2, "--steps_per_epoch", 2, "--checkpoint_every", 2)
    return root


def test_dicom_sources_pack_by_patient_with_registered_pairs(dicom_run):
    manifest = read_manifest(dicom_run / "shards")
    assert manifest["skipped"] == [] and len(manifest["files"]) == 18
    subjects = {s for split in manifest["splits"].values() for s in split["subjects"]}
    assert subjects and all(s.startswith("PAT") for s in subjects)
    records = manifest["registration"]["subjects"]
    assert records and all(r["paired"] and r["max_displacement_mm"] < 2.0 for r in records.values())


def test_a_dicom_series_translates_to_a_synthetic_dicom_series_on_its_geometry(dicom_run, dicom_sources, tmp_path):
    checkpoint = rundir.checkpoint_dir(dicom_run / "run", 2)
    series_folder = dicom_sources / "t1" / "PAT036" if (dicom_sources / "t1" / "PAT036").exists() else next((dicom_sources / "t1").iterdir())
    ident = series_folder.name[3:]
    nifti = next((dicom_sources / "nifti").glob(f"IXI{ident}-*-T1.nii.gz"))
    run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", series_folder,
               "--output", tmp_path, "--output-format", "dicom")
    run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", nifti, "--output", tmp_path)
    derived = tmp_path / f"{series_folder.name}_t1-to-t2"
    files = sorted(derived.iterdir())
    assert len(files) == 37 and not list(tmp_path.glob(".*"))

    reader = sitk.ImageSeriesReader()  # an independent reader: GDCM orders and stacks the series itself
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(derived)))
    from_dicom = reader.Execute()
    source = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(series_folder / "T1")))
    from_nifti = sitk.ReadImage(str(tmp_path / f"{nifti.name[:-7]}_t1-to-t2.nii.gz"))
    for image in (source, from_nifti):
        np.testing.assert_allclose(from_dicom.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(from_dicom.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(from_dicom.GetDirection(), image.GetDirection(), atol=1e-5)
    values, want = sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nifti)
    assert want.max() > 0.1
    np.testing.assert_allclose(values, want, atol=1.0 / 65535)

    inputs = [pydicom.dcmread(p, stop_before_pixels=True) for p in (series_folder / "T1").iterdir()]
    written = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    first = written[0]
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in first.ImageType
    assert first.SeriesDescription.startswith("SYNTHETIC T2w from T1w")
    assert "not acquired" in first.DerivationDescription.lower() and str(checkpoint) in first.DerivationDescription
    assert {w.PatientID for w in written} == {inputs[0].PatientID} and {w.StudyInstanceUID for w in written} == {inputs[0].StudyInstanceUID}
    assert {w.SeriesInstanceUID for w in written} == {first.SeriesInstanceUID} != {inputs[0].SeriesInstanceUID}
    new_uids = {w.SOPInstanceUID for w in written}
    assert len(new_uids) == len(written) and not new_uids & {i.SOPInstanceUID for i in inputs}
    assert {w.SourceImageSequence[0].ReferencedSOPInstanceUID for w in written} == {i.SOPInstanceUID for i in inputs}

    again = run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", series_folder,
                       "--output", tmp_path, "--output-format", "dicom", check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    refused = run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", nifti,
                         "--output", tmp_path / "x", "--output-format", "dicom", check=False)
    assert refused.returncode == 1 and "needs a DICOM series" in refused.stderr and not (tmp_path / "x").exists()


def _break(folder: Path, case: str) -> None:
    """Damage a copy of a T1 series the way real exports go wrong."""
    files = sorted(folder.rglob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0]))
    if case == "missing slices":
        files[len(files) // 2].unlink()
    elif case == "uneven spacing":
        ds = pydicom.dcmread(files[5])
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 1.5, *ds.ImagePositionPatient[1:]]
        ds.save_as(files[5])
    elif case == "mixed orientations":
        ds = pydicom.dcmread(files[3])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(files[3])
    elif case == "not MR":
        for path in files:
            ds = pydicom.dcmread(path)
            ds.Modality = "CT"
            ds.save_as(path)
    elif case == "several series":
        for path in files[:10]:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = "1.2.826.0.1.999"
            ds.SeriesDescription = "localizer"
            ds.save_as(path)
    elif case in ("spacing in micrometres", "zero pixel spacing"):  # micrometres: the axial grid would span 1.3 km
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PixelSpacing = [float(v) * (1000 if case == "spacing in micrometres" else 0) for v in ds.PixelSpacing]
            ds.save_as(path)
    elif case == "rescaled past float32":  # a RescaleSlope of 1e39: every tissue voxel becomes infinite
        for path in files:
            ds = pydicom.dcmread(path)
            ds.RescaleSlope = "1e39"
            ds.save_as(path)
    elif case in ("RGB", "MONOCHROME1"):  # a screenshot-like export; an inverted grey scale
        for path in files:
            ds = pydicom.dcmread(path)
            if case == "RGB":
                grey = ds.pixel_array.astype(np.uint8)
                ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
                ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            else:
                ds.PhotometricInterpretation = "MONOCHROME1"
            ds.save_as(path)
    elif case == "compressed":
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGLSLossless

        ds = pydicom.dcmread(files[0])
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])  # JPEG-LS: no decoder for it is installed
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.save_as(files[0], enforce_file_format=True)


BAD = {"missing slices": "1 slice(s) missing", "uneven spacing": "uneven slice spacing", "mixed orientations": "mixed slice orientations",
       "not MR": "not MR", "several series": "several series where one was expected", "compressed": "JPEG-LS",
       "spacing in micrometres": "MAX_EXTENT_MM", "zero pixel spacing": "affine is degenerate",
       "rescaled past float32": "all voxels are NaN or infinite", "RGB": "PhotometricInterpretation ['RGB']",
       "MONOCHROME1": "PhotometricInterpretation ['MONOCHROME1']"}


@pytest.mark.parametrize("case", BAD)
def test_a_broken_series_is_refused_with_its_name_and_the_reason(case, dicom_sources, tmp_path):
    folder = tmp_path / "t1" / "PATBAD"
    shutil.copytree(next((dicom_sources / "t1").iterdir()), folder)
    _break(folder, case)
    with pytest.raises(ValueError) as err:
        if case == "several series":  # the source's only subject is refused at listing: nothing usable remains
            list_source(tmp_path / "t1", "t1")
        load_ref(list_source(tmp_path / "t1", "t1")[0][0])
    assert str(folder) in str(err.value) and "series 1.2.826" in str(err.value) and BAD[case] in str(err.value), err.value


@pytest.mark.parametrize("case", ["missing slices", "several series"])
def test_translate_refuses_a_broken_series_and_writes_nothing(case, dicom_run, dicom_sources, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(next((dicom_sources / "t1").iterdir()), folder)
    _break(folder, case)
    result = run_module("train.translate", "--checkpoint", rundir.checkpoint_dir(dicom_run / "run", 2), "--direction", "t1-to-t2",
                        "--input", folder, "--output", tmp_path / "out", "--output-format", "dicom", check=False)
    assert result.returncode == 1 and BAD[case] in result.stderr and "series 1.2.826" in result.stderr
    assert not any((tmp_path / "out").iterdir())
