"""A synthetic IXI stand-in: IXI-T1.tar and IXI-T2.tar with IXI's names, geometry and quirks.

T1 is a sagittal 256x256x150 acquisition at 0.9375x0.9375x1.2 mm (voxel axes P, I, R: not RAS); T2 is an
axial 256x256x130 acquisition at 0.9375x0.9375x1.2 mm (voxel axes L, P, S). A few subjects miss one contrast,
as in IXI (581 T1, 578 T2). `downsample` keeps the field of view and divides the matrix, for fast tests and
the demo; its noise is that of the full-size image block-averaged (SNR grows with the voxel volume).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .phantom import Anatomy, render

# shape, voxel size (mm), voxel-axis directions in RAS, centre of the field of view (mm)
GEOMETRY = {
    "T1": ((256, 256, 150), (0.9375, 0.9375, 1.2), ((0, -1, 0), (0, 0, -1), (1, 0, 0)), (0, 0, 0)),
    "T2": ((256, 256, 130), (0.9375, 0.9375, 1.2), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (0, 0, 10)),
}
SITE_SHARES = (("Guys", 0.55), ("HH", 0.32), ("IOP", 0.13))


@dataclass(frozen=True)
class Subject:
    number: int
    site: str
    series: int
    contrasts: tuple[str, ...]

    def filename(self, contrast: str) -> str:
        return f"IXI{self.number:03d}-{self.site}-{self.series:04d}-{contrast}.nii.gz"


def subjects(count: int, seed: int) -> list[Subject]:
    """IXI-like subject table: sparse 3-digit ids, sites by IXI's shares, ~1% with a single contrast."""
    rng = np.random.default_rng(seed)
    numbers = np.sort(rng.choice(np.arange(2, 1000), size=count, replace=False))
    sites = rng.choice([s for s, _ in SITE_SHARES], size=count, p=[p for _, p in SITE_SHARES])
    contrasts = [("T1", "T2")] * count
    if count >= 6:  # IXI: 581 T1 and 578 T2 of about 585 subjects
        single = rng.choice(count, size=max(2, round(count * 0.012)), replace=False)
        for n, index in enumerate(single):
            contrasts[index] = ("T1",) if n % 2 == 0 else ("T2",)
    return [Subject(int(n), str(s), int(rng.integers(0, 10000)), c) for n, s, c in zip(numbers, sites, contrasts)]


def grid(contrast: str, downsample: int = 1) -> tuple[tuple[int, int, int], np.ndarray]:
    shape, zooms, axes, centre = GEOMETRY[contrast]
    shape = tuple(max(1, s // downsample) for s in shape)
    affine = np.eye(4)
    affine[:3, :3] = np.array(axes, float).T * (np.array(zooms) * downsample)
    affine[:3, 3] = np.array(centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, affine


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=4, mtime=0)


def render_subject(subject: Subject, seed: int, downsample: int) -> dict[str, bytes]:
    """Both contrasts of one subject as .nii.gz bytes. Deterministic in (seed, subject number)."""
    rng = np.random.default_rng([seed, subject.number])
    anatomy = Anatomy.random(rng)
    out = {}
    for contrast in subject.contrasts:
        shape, affine = grid(contrast, downsample)
        image = render(anatomy, contrast, subject.site, shape, affine, rng, voxels_averaged=downsample**3)
        out[contrast] = nifti_bytes(image, affine)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def synthesize(out: str | os.PathLike, count: int, seed: int = 0, downsample: int = 1, workers: int | None = None):
    """Write out/IXI-T1.tar and out/IXI-T2.tar (flat member names, as IXI ships them)."""
    if count < 1:
        raise ValueError("--subjects must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = subjects(count, seed)
    parts = {c: out / f"IXI-{c}.tar.part" for c in ("T1", "T2")}
    tars = {c: tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) for c, p in parts.items()}
    try:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            rendered = pool.map(render_subject, table, [seed] * count, [downsample] * count)
            for subject, volumes in tqdm(zip(table, rendered), total=count, desc="synth", unit="subject"):
                for contrast, data in volumes.items():
                    _add(tars[contrast], subject.filename(contrast), data)
    finally:
        for tar in tars.values():
            tar.close()
    for contrast, part in parts.items():
        os.replace(part, out / f"IXI-{contrast}.tar")
    return table
