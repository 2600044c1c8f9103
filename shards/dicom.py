"""DICOM series in and out (pydicom).

In: a folder of DICOM files, any nesting, is grouped into series by SeriesInstanceUID. A series' subject is
its PatientID, with a short study tag when one patient has several studies in the source. Slices are
ordered by their position along the slice normal, never by file name. The RAS affine comes from
ImageOrientationPatient, ImagePositionPatient and PixelSpacing, so a series packs and translates exactly
like the NIfTI a converter would make of it. A series that cannot be one trustworthy volume is refused,
with a reason naming it: missing slices, uneven spacing, mixed orientations, a modality other than MR, or
pixel data the installed decoders cannot read.

Out: `write_series` writes a translation as a new series on the input's geometry, with the input's patient
and study identifiers and new series and instance UIDs. It is marked as derived and synthetic in every
place a viewer or PACS shows (ImageType, SeriesDescription, DerivationDescription), and it references the
source images it was computed from.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from . import __version__
from .preprocess import MAX_VOXELS, VolumeError, check_geometry, check_intensities, read_file

MAX_FILES = 4096  # slices in one series; IXI's have 130-150
SPACING_TOLERANCE = 0.01  # relative: slice gaps may differ from the median by this much
ORIENTATION_TOLERANCE = 1e-3  # direction-cosine difference still taken as the same orientation
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
HEADER_TAGS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SeriesNumber", "SeriesDescription")


@dataclass(frozen=True)
class SeriesRef:
    """One series found in a folder: its files, and what names it."""

    uid: str
    patient: str
    study: str
    description: str
    files: tuple[str, ...]

    def name(self, root: Path) -> str:
        folder = os.path.commonpath(self.files)
        folder = folder if Path(folder).is_dir() else str(Path(folder).parent)
        label = f"series {self.uid}" + (f" '{self.description}'" if self.description else "")
        return f"{folder} ({label}, {len(self.files)} files)"


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_series(paths: list[Path]) -> tuple[list[SeriesRef], list[dict]]:
    """Group DICOM files by series (headers only; pixel data is not read). Returns the series and
    {file, reason} for files whose header cannot be read."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
            uid = str(header.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as err:
            skipped.append({"file": str(path), "reason": f"unreadable DICOM header ({type(err).__name__}: {err})"})
            continue
        groups.setdefault(uid, []).append((path, header))
    studies_of: dict[str, set[str]] = {}
    for members in groups.values():
        header = members[0][1]
        studies_of.setdefault(str(header.get("PatientID", "")), set()).add(str(header.get("StudyInstanceUID", "")))
    found = []
    for uid, members in sorted(groups.items()):
        header = members[0][1]
        patient, study = str(header.get("PatientID", "")), str(header.get("StudyInstanceUID", ""))
        found.append(SeriesRef(uid, patient, study if len(studies_of[patient]) > 1 else "",
                               str(header.get("SeriesDescription", "")), tuple(str(p) for p, _ in members)))
    return found, skipped


def subject_of(series: SeriesRef) -> str:
    """PatientID, with a short tag of the study when the patient has several in this source."""
    if not series.patient.strip():
        raise ValueError("no PatientID: cannot tell whose scan this is")
    return series.patient.strip() + (f"-study-{hashlib.sha1(series.study.encode()).hexdigest()[:8]}" if series.study else "")


@dataclass
class Volume:
    """A series as a volume: float32 data on voxel axes (column, row, slice), its RAS affine, and the slice
    headers (pixel data dropped) in the same order, which `write_series` needs to write beside it."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    headers: list[Dataset]
    md5: str  # of the files' bytes, in file-name order (the manifest's record of what was read)


def load_series(files: tuple[str, ...] | list[str], name: str) -> Volume:
    """Read, check and stack one series; raises VolumeError naming the series (`name`) and the problem."""
    if len(files) > MAX_FILES:
        raise VolumeError(f"{name}: {len(files)} files, more than the {MAX_FILES} slices a series may have (MAX_FILES)")
    slices, digest = [], hashlib.md5()
    for path in sorted(files):
        try:
            raw = read_file(path)
            digest.update(raw)
            slices.append(pydicom.dcmread(io.BytesIO(raw)))
        except (InvalidDicomError, OSError, ValueError) as err:
            raise VolumeError(f"{name}: {path}: unreadable DICOM ({err})") from err
    first = slices[0]
    modality = str(first.get("Modality", ""))
    if modality != "MR" or any(str(s.get("Modality", "")) != modality for s in slices):
        raise VolumeError(f"{name}: modality {sorted({str(s.get('Modality', '')) for s in slices})}, not MR: this project translates MRI only")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{name}: a multi-frame (enhanced) DICOM object; export the series as one file per slice")
    photometric = sorted({str(s.get("PhotometricInterpretation", "MONOCHROME2")) for s in slices})
    if photometric != ["MONOCHROME2"]:  # MONOCHROME1 draws high values dark; RGB is a picture of a scan, not the scan
        raise VolumeError(f"{name}: PhotometricInterpretation {photometric}, not MONOCHROME2: an MR series is a grey scale "
                          f"where higher is brighter; export the scan itself")
    try:
        orientations = np.array([[float(v) for v in s.ImageOrientationPatient] for s in slices])
        positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices])
        spacing = np.array([[float(v) for v in s.PixelSpacing] for s in slices])
        sizes = {(int(s.Rows), int(s.Columns)) for s in slices}
    except (AttributeError, TypeError, ValueError) as err:
        raise VolumeError(f"{name}: a slice lacks geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing, "
                          f"Rows, Columns): {err}") from err
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise VolumeError(f"{name}: mixed slice orientations (ImageOrientationPatient differs between slices); "
                          f"a volume has one")
    if len(sizes) > 1 or np.abs(spacing - spacing[0]).max() > 1e-4:
        raise VolumeError(f"{name}: slices differ in matrix size or pixel spacing ({sorted(sizes)})")
    if len(slices) < 2:
        raise VolumeError(f"{name}: a single slice is not a volume")
    (rows, columns), = sizes
    if rows * columns * len(slices) > MAX_VOXELS:
        raise VolumeError(f"{name}: {rows}x{columns}x{len(slices)} voxels, more than the {MAX_VOXELS} a volume may have (MAX_VOXELS)")
    along_row, along_column = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(along_row, along_column)
    depth = positions @ normal
    order = np.argsort(depth)
    slices, positions, depth = [slices[i] for i in order], positions[order], depth[order]
    gaps = np.diff(depth)
    step = float(np.median(gaps))
    if step < 1e-3:
        raise VolumeError(f"{name}: two or more slices at the same position (duplicates?)")
    uneven = np.abs(gaps - step) > SPACING_TOLERANCE * step
    if uneven.any():
        k = int(np.flatnonzero(uneven)[0])
        missing = round(gaps[k] / step) - 1
        if missing >= 1 and abs(gaps[k] - (missing + 1) * step) <= SPACING_TOLERANCE * step:
            raise VolumeError(f"{name}: {missing} slice(s) missing between positions {depth[k]:.2f} and {depth[k + 1]:.2f} mm "
                              f"(spacing {step:.2f} mm)")
        raise VolumeError(f"{name}: uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm); a volume needs one spacing")
    in_plane = positions - positions[0] - np.outer(depth - depth[0], normal)
    if np.abs(in_plane).max() > SPACING_TOLERANCE * step + 1e-3:
        raise VolumeError(f"{name}: slice positions do not lie along the slice normal (a tilted or sheared stack)")
    row_mm, column_mm = spacing[0]  # PixelSpacing: between rows, then between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = along_row * column_mm, along_column * row_mm, normal * step, positions[0]
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    try:
        check_geometry((columns, rows, len(slices)), affine)
    except VolumeError as err:
        raise VolumeError(f"{name}: {err}") from None
    data = np.empty((columns, rows, len(slices)), np.float32)
    syntax = first.file_meta.get("TransferSyntaxUID", "unknown")
    for k, s in enumerate(slices):
        try:
            pixels = s.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises several kinds when no installed plugin decodes a syntax
            label = getattr(syntax, "name", str(syntax))
            raise VolumeError(f"{name}: cannot decode its pixel data, transfer syntax {label} ({syntax}), with the installed "
                              f"decoders ({type(err).__name__}: {err})") from err
        with np.errstate(over="ignore", invalid="ignore"):  # a rescale past float32 is judged below, as NIfTI's scaling is
            data[:, :, k] = (pixels * float(s.get("RescaleSlope", 1) or 1) + float(s.get("RescaleIntercept", 0) or 0)).T
        del s.PixelData
    try:
        check_intensities(data)
    except VolumeError as err:
        raise VolumeError(f"{name}: {err}") from None
    np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return Volume(data, affine, (float(column_mm), float(row_mm), step), slices, digest.hexdigest())


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under `folder`, at any depth (hidden files left out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom(p))


def read_series(folder: Path) -> Volume:
    """The one DICOM series in `folder`; VolumeError naming the series when there are several or it is unusable."""
    series, unreadable = find_series(dicom_files(folder))
    if not series and not unreadable:
        raise VolumeError(f"{folder}: no DICOM files (Part 10: 'DICM' after a 128-byte preamble)")
    if unreadable:
        raise VolumeError(f"{unreadable[0]['file']}: {unreadable[0]['reason']}")
    if len(series) > 1:
        names = "; ".join(s.name(folder) for s in series)
        raise VolumeError(f"several series where one was expected: {names}. Give the folder of one series")
    return load_series(series[0].files, series[0].name(folder))


# identifiers a derived series keeps, so that it files under the same patient, study and frame of reference
KEPT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate", "StudyTime",
        "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
        "PositionReferenceIndicator", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns")
SERIES_OFFSET = 1000  # the derived series' number: the source's plus this


def write_series(folder: Path, data: np.ndarray, source: Volume, description: str, derivation: str) -> None:
    """Write `data` ([0,1] float, on `source`'s voxel grid) as a new DICOM series in `folder`, one file per
    slice, under a temporary name renamed when complete. Stored as 16-bit integers with a rescale, so a
    reader's real-world values are `data` (to 1/65535)."""
    if data.shape != source.data.shape:
        raise ValueError(f"{data.shape} does not match the source series' {source.data.shape}")
    series_uid, now = generate_uid(), datetime.datetime.now()
    stored = np.round(np.clip(data, 0.0, 1.0) * 65535).astype(np.uint16)
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True)
    try:
        for k, original in enumerate(source.headers):
            ds = Dataset()
            for keyword in KEPT:
                if keyword in original:
                    setattr(ds, keyword, original.data_element(keyword).value)
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
            ds.SeriesInstanceUID, ds.Modality = series_uid, "MR"
            ds.SeriesNumber = int(original.get("SeriesNumber", 0) or 0) + SERIES_OFFSET
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = original.ImagePositionPatient
            ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
            ds.SeriesDescription = description[:64]
            ds.DerivationDescription = derivation[:1024]
            ds.SourceImageSequence = [Dataset()]
            ds.SourceImageSequence[0].ReferencedSOPClassUID = original.SOPClassUID
            ds.SourceImageSequence[0].ReferencedSOPInstanceUID = original.SOPInstanceUID
            ds.BurnedInAnnotation = "NO"
            ds.Manufacturer, ds.SoftwareVersions = "mri-cyclegan", __version__
            ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", ""  # nothing was acquired
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{1 / 65535:.10g}", "0", "US"
            ds.WindowCenter, ds.WindowWidth = "0.5", "1"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            pydicom.dcmwrite(tmp / f"IM{k + 1:05d}.dcm", ds, enforce_file_format=True)
        if folder.exists():  # an earlier translation (the caller has checked --overwrite)
            if any(not (p.name.startswith("IM") and p.suffix == ".dcm") for p in folder.iterdir()):
                raise VolumeError(f"{folder}: holds files other than a series this tool wrote; not replacing it")
            old = folder.with_name(f".{folder.name}.old")
            folder.replace(old)
            tmp.replace(folder)
            shutil.rmtree(old)
        else:
            tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
