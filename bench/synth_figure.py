"""Draw docs/images/synth-axial.png: one axial slice (world z = +25 mm) of T1 (top) and T2 (bottom) for three
synthetic subjects at IXI's full resolution.

    python bench/synth_figure.py [--out docs/images/synth-axial.png]
"""

import argparse
import gzip

import nibabel as nib
import numpy as np
from PIL import Image

from shards.synth import render_subject, subjects

TILE = 240


def axial_tile(data: bytes, z_mm: float = 25.0) -> np.ndarray:
    image = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(data)))
    volume = image.get_fdata()
    k = int(round(np.linalg.solve(image.affine, [0, 0, z_mm, 1])[2]))
    plane = volume[:, ::-1, k].T / np.percentile(volume, 99.5)  # anterior up
    zooms = image.header.get_zooms()
    tile = Image.fromarray((np.clip(plane, 0, 1) * 255).astype(np.uint8))
    tile = tile.resize((round(plane.shape[1] * zooms[0]), round(plane.shape[0] * zooms[1])))  # 1 mm pixels
    canvas = Image.new("L", (TILE, TILE))
    canvas.paste(tile, ((TILE - tile.width) // 2, (TILE - tile.height) // 2))
    return np.asarray(canvas)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/images/synth-axial.png")
    args = parser.parse_args()
    chosen = [s for s in subjects(10, seed=0) if s.contrasts == ("T1", "T2")][:3]
    tiles = {"T1": [], "T2": []}
    for subject in chosen:
        for contrast, data in render_subject(subject, 0, 1).items():
            tiles[contrast].append(axial_tile(data))
    Image.fromarray(np.concatenate([np.concatenate(tiles[c], 1) for c in ("T1", "T2")], 0)).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
