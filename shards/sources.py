"""Find the volumes in a source: an IXI tar, a folder of NIfTI files, a folder of DICOM series, or a folder
of 2D images.

Listing is cheap (names and offsets only); the bytes are read later, in a worker, by `read_bytes`.
Tar members are read in place by offset: the tar is never extracted to disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .dicom import find_series, is_dicom, load_series, subject_of
from .format import safe_subject
from .preprocess import MAX_FILE_BYTES, VolumeError, load_image, load_nifti, read_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IXI_NAME = re.compile(r"^(IXI\d{3})-(Guys|HH|IOP)-\d{4}-(T1|T2|lesion)\.nii(?:\.gz)?$")
BIDS_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?(?:_[a-z]+-[A-Za-z0-9]+)*_(T1w|T2w|lesion)\.nii(?:\.gz)?$")
NAME_HELP = "expected IXI<id>-<Guys|HH|IOP>-<nnnn>-<T1|T2|lesion>.nii.gz or BIDS sub-<id>[_ses-<id>]_<T1w|T2w|lesion>.nii.gz"


class SourceError(ValueError):
    """A source that holds nothing usable at all."""


@dataclass(frozen=True)
class VolumeRef:
    """Where one volume (or 2D image) lives. For tar members, offset/size locate its bytes."""

    subject: str
    site: str | None
    contrast: str  # "t1" | "t2" | "lesion" (a lesion mask)
    name: str  # shown in messages and the manifest
    kind: str  # "nifti" | "image" | "dicom"
    path: str
    offset: int = -1
    size: int = -1
    files: tuple[str, ...] = ()  # a DICOM series' files, in no particular order


def load_ref(ref: VolumeRef):
    """The volume (data, affine, zooms) or 2D image a ref points to, and the MD5 of its bytes."""
    if ref.kind == "dicom":
        volume = load_series(ref.files, ref.name)
        return (volume.data, volume.affine, volume.zooms), volume.md5
    data = read_bytes(ref)
    return (load_nifti(data) if ref.kind == "nifti" else load_image(data)), hashlib.md5(data).hexdigest()


def read_bytes(ref: VolumeRef) -> bytes:
    if ref.offset < 0:
        return read_file(ref.path)
    if ref.size > MAX_FILE_BYTES:
        raise VolumeError(f"{ref.size} bytes: larger than the {MAX_FILE_BYTES // 2**20} MiB a volume may take (MAX_FILE_BYTES)")
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.size)
    if len(data) != ref.size:
        raise ValueError(f"truncated tar: member ends {ref.size - len(data)} bytes past the end of {ref.path}")
    return data


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


def _identify(filename: str, contrast: str, kind: str) -> tuple[str, str | None]:
    """(subject, site) from a file name; raises ValueError with the reason it cannot be used."""
    if kind == "image":  # 2D slices carry no naming scheme: the file stem is the subject
        return safe_subject(Path(filename).stem.rsplit(".", 1)[0]), None
    for pattern, site_group in ((IXI_NAME, 2), (BIDS_NAME, None)):
        match = pattern.match(filename)
        if match:
            found = match.group(3).lower().removesuffix("w")
            if found != contrast:
                raise ValueError(f"is a {found.upper()} file in the --{contrast} source")
            subject = match.group(1) + (f"-ses-{match.group(2)}" if pattern is BIDS_NAME and match.group(2) else "")
            return safe_subject(subject), match.group(site_group) if site_group else None
    raise ValueError(f"unknown file-name pattern ({NAME_HELP})")


def list_source(src: str | os.PathLike, contrast: str) -> tuple[list[VolumeRef], list[dict]]:
    """All usable volumes in `src` for `contrast`, and {file, reason} for every file that is not."""
    src = Path(src)
    refs, skipped = [], []

    def consider(name: str, filename: str, path: str, offset: int = -1, size: int = -1):
        kind = _kind(filename)
        if kind is None:
            skipped.append({"file": name, "reason": "not a NIfTI (.nii/.nii.gz), DICOM or image (png/jpg/tif) file"})
            return
        try:
            subject, site = _identify(filename, contrast, kind)
        except ValueError as err:
            skipped.append({"file": name, "reason": str(err)})
            return
        refs.append(VolumeRef(subject, site, contrast, name, kind, path, offset, size))

    if src.is_file() and tarfile.is_tarfile(src):
        skipped += _list_tar(src, consider)
    elif src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
        dicom = [p for p in files if _kind(p.name) is None and is_dicom(p)]
        others = set(files) - set(dicom)  # a scanner export holds ~10^5 files: no list lookups per file
        for path in files:
            if path in others:
                consider(str(path), path.name, str(path))
        series, unreadable = find_series(dicom)
        skipped += unreadable
        for found in series:
            try:
                refs.append(VolumeRef(safe_subject(subject_of(found)), None, contrast, found.name(src), "dicom", str(src), files=found.files))
            except ValueError as err:
                skipped.append({"file": found.name(src), "reason": str(err)})
    elif src.exists():
        raise SourceError(f"{src}: not a tar file or a folder")
    else:
        raise SourceError(f"{src}: no such file or folder")
    duplicates = {r.subject for r in refs if sum(o.subject == r.subject for o in refs) > 1}
    for ref in [r for r in refs if r.subject in duplicates]:
        others = "several series where one was expected" if ref.kind == "dicom" else "appears more than once"
        skipped.append({"file": ref.name, "reason": f"subject {ref.subject}: {others} in the --{contrast} source"})
    refs = [r for r in refs if r.subject not in duplicates]
    if not refs:
        example = f" ({len(skipped)} files skipped, e.g. {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""
        raise SourceError(f"{src}: no usable {contrast.upper()} volumes or images found{example}")
    return refs, skipped


def _list_tar(path: Path, consider) -> list[dict]:
    """Walk the tar's headers (seeking past the data) and hand each regular member to `consider`."""
    skipped = []
    file_size = path.stat().st_size
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.ReadError, EOFError) as err:
                skipped.append({"file": f"{path}", "reason": f"truncated or corrupt tar after the last good member ({err})"})
                break
            if member is None:
                break
            if not member.isfile():
                continue
            name = f"{path}:{member.name}"
            if member.offset_data + member.size > file_size:
                skipped.append({"file": name, "reason": "truncated tar: this member runs past the end of the file"})
                continue
            consider(name, Path(member.name).name, str(path), member.offset_data, member.size)
    return skipped
