"""A synthetic IXI stand-in: IXI-T1.tar and IXI-T2.tar with IXI's names, geometry and quirks.

T1 is a sagittal 256x256x150 acquisition at 0.9375x0.9375x1.2 mm (voxel axes P, I, R: not RAS); T2 is an
axial 256x256x130 acquisition at 0.9375x0.9375x1.2 mm (voxel axes L, P, S). A few subjects miss one contrast,
as in IXI (581 T1, 578 T2). `downsample` keeps the field of view and divides the matrix, for fast tests and
the demo; its noise is that of the full-size image block-averaged (SNR grows with the voxel volume).

The fidelity test set (docs/fidelity.md): `lesions` gives some subjects focal white-matter lesions and writes
their masks on the T2 grid to IXI-lesions.tar; `holdout_anatomy` gives some subjects enlarged ventricles, an
anatomy no training subject has. Both kinds are listed in holdout.txt, which `pack --holdout` keeps out of
training.

`motion` moves each subject's head between its T1 and T2 acquisitions by a random rigid motion, as real
heads move between two series; the true transforms go to motion.json, the known answer for `pack --register`.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .format import write_json_atomic
from .phantom import LESION, Anatomy, render, tissue_volume

# shape, voxel size (mm), voxel-axis directions in RAS, centre of the field of view (mm)
GEOMETRY = {
    "T1": ((256, 256, 150), (0.9375, 0.9375, 1.2), ((0, -1, 0), (0, 0, -1), (1, 0, 0)), (0, 0, 0)),
    "T2": ((256, 256, 130), (0.9375, 0.9375, 1.2), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (0, 0, 10)),
}
SITE_SHARES = (("Guys", 0.55), ("HH", 0.32), ("IOP", 0.13))
HOLDOUT_FILE = "holdout.txt"
MOTION_FILE = "motion.json"
LESION_TAR = "IXI-lesions.tar"
MIN_SUBJECTS_FOR_HOLDOUT = 10  # below this, held-out subjects would leave pack's val/test or train nearly empty
ENLARGED_VENTRICLES = (2.0, 2.4)  # ventricle_scale; training subjects draw from 0.7-1.5


@dataclass(frozen=True)
class Subject:
    number: int
    site: str
    series: int
    contrasts: tuple[str, ...]
    lesions: int = 0
    variant: str | None = None  # "enlarged-ventricles" for the held-out anatomy

    @property
    def ident(self) -> str:
        return f"IXI{self.number:03d}"

    @property
    def held_out(self) -> bool:
        return bool(self.lesions or self.variant)

    def filename(self, contrast: str) -> str:
        return f"{self.ident}-{self.site}-{self.series:04d}-{contrast}.nii.gz"


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


def mark_held_out(table: list[Subject], seed: int, lesions: bool, holdout_anatomy: bool) -> list[Subject]:
    """About 10% of the paired subjects get 3-6 lesions, and about 5% enlarged ventricles (disjoint sets)."""
    if not (lesions or holdout_anatomy):
        return table
    if len(table) < MIN_SUBJECTS_FOR_HOLDOUT:
        flags = " ".join(f for f, on in (("--lesions", lesions), ("--holdout-anatomy", holdout_anatomy)) if on)
        raise ValueError(f"{flags} needs --subjects >= {MIN_SUBJECTS_FOR_HOLDOUT}: those subjects are kept out of training "
                         f"for val/test, and {len(table)} subjects leave no room for them")
    rng = np.random.default_rng([seed, 1])
    paired = [i for i, s in enumerate(table) if len(s.contrasts) == 2]
    order = [paired[i] for i in rng.permutation(len(paired))]
    n_lesion = max(1, round(0.1 * len(table))) if lesions else 0
    n_variant = max(1, round(0.05 * len(table))) if holdout_anatomy else 0
    table = list(table)
    for i in order[:n_lesion]:
        table[i] = replace(table[i], lesions=int(rng.integers(3, 7)))
    for i in order[n_lesion:n_lesion + n_variant]:
        table[i] = replace(table[i], variant="enlarged-ventricles")
    return table


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


def subject_anatomy(subject: Subject, rng: np.random.Generator, seed: int) -> Anatomy:
    """The subject's anatomy, drawn from `rng`, with its variant and lesions. These draw from their own
    stream, so a subject is otherwise the same with or without them."""
    anatomy = Anatomy.random(rng)
    variant_rng = np.random.default_rng([seed, subject.number, 1])
    if subject.variant == "enlarged-ventricles":
        anatomy = replace(anatomy, ventricle_scale=float(variant_rng.uniform(*ENLARGED_VENTRICLES)))
    if subject.lesions:
        anatomy = anatomy.with_lesions(variant_rng, subject.lesions)
    return anatomy


def head_motion(subject: Subject, seed: int, motion: tuple[float, float] | None) -> np.ndarray:
    """The subject's rigid head motion (4x4, RAS mm) between T1 and T2: up to motion[0] degrees about a
    random axis through the head's centre and up to motion[1] mm in a random direction, taking a T1-session
    world position to the same anatomy's T2-session position; the identity without `motion`. Drawn from its
    own stream, so the subject is otherwise the same with or without it."""
    if not motion:
        return np.eye(4)
    max_deg, max_mm = motion
    centre = subject_anatomy(subject, np.random.default_rng([seed, subject.number]), seed).shift
    rng = np.random.default_rng([seed, subject.number, 2])
    angle = np.radians(rng.uniform(0, max_deg))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0, max_mm)
    moved = np.eye(4)
    moved[:3, :3] = rotation
    moved[:3, 3] = centre - rotation @ centre + shift
    return moved


def render_subject(subject: Subject, seed: int, downsample: int, motion: tuple[float, float] | None = None) -> dict[str, bytes]:
    """Both contrasts of one subject as .nii.gz bytes, T2 moved by `head_motion`. Deterministic in (seed,
    subject number)."""
    rng = np.random.default_rng([seed, subject.number])
    anatomy = subject_anatomy(subject, rng, seed)
    moved = head_motion(subject, seed, motion)
    out = {}
    for contrast in subject.contrasts:
        shape, affine = grid(contrast, downsample)
        # the scanner's grid (and bias field) stay put; the head under it has moved by `moved` for T2
        labels = tissue_volume(anatomy, shape, np.linalg.inv(moved) @ affine if contrast == "T2" else affine)
        out[contrast] = nifti_bytes(render(labels, contrast, subject.site, affine, rng, voxels_averaged=downsample**3), affine)
        if subject.lesions and contrast == "T2":  # the mask lives on the T2 grid, where lesions are bright
            out["lesion"] = nifti_bytes((labels == LESION).astype(np.uint8), affine)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def synthesize(out: str | os.PathLike, count: int, seed: int = 0, downsample: int = 1, workers: int | None = None,
               lesions: bool = False, holdout_anatomy: bool = False, motion: tuple[float, float] | None = None):
    """Write out/IXI-T1.tar and out/IXI-T2.tar (flat member names, as IXI ships them), and with `lesions`
    or `holdout_anatomy` also IXI-lesions.tar and holdout.txt, with `motion` (degrees, mm) motion.json."""
    if motion and (len(motion) != 2 or not all(0 <= m < 90 for m in motion)):
        raise ValueError(f"--motion must be DEG,MM with both in [0, 90), got {motion}")
    if count < 1:
        raise ValueError("--subjects must be at least 1")
    table = mark_held_out(subjects(count, seed), seed, lesions, holdout_anatomy)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {"T1": "IXI-T1.tar", "T2": "IXI-T2.tar", **({"lesion": LESION_TAR} if lesions else {})}
    parts = {c: out / f"{name}.part" for c, name in names.items()}
    tars = {c: tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) for c, p in parts.items()}
    try:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            rendered = pool.map(render_subject, table, [seed] * count, [downsample] * count, [motion] * count)
            for subject, volumes in tqdm(zip(table, rendered), total=count, desc="synth", unit="subject"):
                for contrast, data in volumes.items():
                    _add(tars[contrast], subject.filename(contrast), data)
    finally:
        for tar in tars.values():
            tar.close()
    for contrast, part in parts.items():
        os.replace(part, out / names[contrast])
    if lesions or holdout_anatomy:
        lines = [f"{s.ident}  # {f'{s.lesions} lesions' if s.lesions else s.variant}" for s in table if s.held_out]
        tmp = out / f"{HOLDOUT_FILE}.part"
        tmp.write_text("# subjects `pack --holdout` keeps out of training (val/test only)\n" + "\n".join(lines) + "\n")
        os.replace(tmp, out / HOLDOUT_FILE)
    if motion:
        write_json_atomic(out / MOTION_FILE, {
            "about": "per subject, the true head motion between T1 and T2: a 4x4 RAS mm matrix taking a T1 world "
                     "position to the same anatomy's T2 world position (pack --register recovers it)",
            "max_rotation_deg": motion[0], "max_translation_mm": motion[1],
            "subjects": {s.ident: np.round(head_motion(s, seed, motion), 8).tolist() for s in table if len(s.contrasts) == 2}})
    return table
