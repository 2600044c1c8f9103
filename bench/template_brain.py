"""Real brain anatomy for the fidelity bench (`fidelity_bench.py --anatomy template`): axial slices of the MNI
ICBM152 2009a symmetric template, a real brain that PyPI carries (the IXI download needs the internet).

nilearn's wheel carries the template's skull-stripped T1 and its grey- and white-matter probability maps at
1 mm (`pip install --no-deps nilearn`; nothing of nilearn is imported, only its data files are read). The T1
slices are the template's own intensities. The T2 slices are drawn from the tissue maps with the phantom's T2
contrasts (shards/phantom.py's CONTRAST_LUT: CSF 1.0, GM 0.70, WM 0.45; CSF is what the brain mask holds beyond
GM and WM), so folding and partial volume are a real brain's and only the T2 contrast is modelled. Both get
Rician noise at 2% of their brain's 99th percentile, the phantom's Guys level. The template is an average of 152
brains, smoother than one scan, and left-right symmetric.

Like the held-out real brain of issue 36 (95 unpaired training slices per contrast at 128², 20 scored), one brain
gives both sets: 20 slices in two bands of 10 are held out, 3 slices on either side of each band are left out so
that no training slice lies within 4 mm of a scored one, and the other 93 train. Each slice is a 16-bit PNG and
its own subject (`shards pack` reads a folder of 2D images so); holdout.txt names the scored ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from shards.phantom import CONTRAST_LUT, CSF, GM, WM

NOISE = 0.02
SLICES = range(20, 145)  # axial slices whose brain area is at least a fifth of the largest (the packer's own rule)
HELD_OUT = (range(55, 65), range(100, 110))  # basal ganglia and lateral ventricles; centrum semiovale and cortex
MARGIN = 3


def template_folder() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise SystemExit("--anatomy template reads the MNI152 template from nilearn's wheel: pip install --no-deps nilearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def template_volumes() -> tuple[np.ndarray, np.ndarray]:
    """(T1, T2) noise-free, (x, y, z) in RAS at 1 mm, zero outside the brain."""
    folder = template_folder()

    def load(name: str) -> np.ndarray:
        return nib.load(folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz").get_fdata(dtype=np.float32)

    t1 = load("t1")
    brain = t1 > 0
    gm, wm = load("gm") / 255, load("wm") / 255
    csf = np.clip(1 - gm - wm, 0, 1)
    t2 = (CONTRAST_LUT["T2"][CSF] * csf + CONTRAST_LUT["T2"][GM] * gm + CONTRAST_LUT["T2"][WM] * wm) * brain
    return t1 / t1.max(), t2 / t2.max()


def rician(volume: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = np.hypot(volume + rng.normal(scale=sigma, size=volume.shape), rng.normal(scale=sigma, size=volume.shape))
    return np.where(volume > 0, noisy, 0).astype(np.float32)  # skull-stripped: air stays zero


def write_template_slices(out: Path, seed: int = 0) -> None:
    """OUT/t1/NAME.png, OUT/t2/NAME.png and OUT/holdout.txt; written to a temporary folder and renamed."""
    rng = np.random.default_rng(seed)
    held = {z for band in HELD_OUT for z in band}
    near = {z for band in HELD_OUT for z in range(band.start - MARGIN, band.stop + MARGIN)} - held
    partial = out.with_name(out.name + ".partial")
    for contrast, volume in zip(("t1", "t2"), template_volumes()):
        noisy = rician(volume, NOISE * np.percentile(volume[volume > 0], 99), rng)
        (partial / contrast).mkdir(parents=True, exist_ok=True)
        for z in SLICES:
            if z not in near:
                plane = np.rot90(noisy[:, :, z])  # anterior up, the patient's left on the image's left (docs/shards.md)
                Image.fromarray((np.clip(plane / noisy.max(), 0, 1) * 65535).round().astype(np.uint16)).save(
                    partial / contrast / f"mni-z{z:03d}.png")
    (partial / "holdout.txt").write_text("".join(f"mni-z{z:03d}\n" for z in sorted(held)))
    partial.rename(out)
