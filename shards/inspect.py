"""Summarize a shards folder and draw a contact sheet of random samples per split and contrast."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from .format import SPLITS, STREAMS, decode_samples, read_manifest, shard_paths

TILE = 96


def summary(manifest: dict) -> str:
    lines = [f"{manifest['tool']}  created {manifest['created']}  size {manifest['image_size']}  "
             f"spacing {manifest['spacing_mm']:.3g} mm"]
    for split in SPLITS:
        info = manifest["splits"][split]
        counts = ", ".join(f"{stream} {n} slices in {len(info['shards'][stream])} shards" for stream, n in info["slices"].items())
        lines.append(f"  {split:5s}: {len(info['subjects'])} subjects; {counts}")
    lines.append(f"  skipped: {len(manifest['skipped'])}")
    lines += [f"    {s['file']}: {s['reason']}" for s in manifest["skipped"][:20]]
    return "\n".join(lines)


def contact_sheet(root, out_png, per_row: int = 8, seed: int = 0) -> Path:
    """One row per (split, contrast) of `per_row` random slices, paired rows with the mask outlined."""
    rng = random.Random(seed)
    rows = []
    for split in SPLITS:
        for stream in STREAMS[split]:
            paths = shard_paths(root, split, stream)
            if not paths:
                continue
            samples = list(decode_samples(wds.WebDataset(paths, shardshuffle=False, empty_check=False)))
            chosen = rng.sample(samples, min(per_row, len(samples)))
            for contrast in ("t1", "t2"):
                tiles = [_tile(s[contrast], s.get("mask")) for s in chosen if contrast in s]
                if tiles:
                    tiles += [np.zeros((TILE, TILE, 3), np.uint8)] * (per_row - len(tiles))
                    rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise ValueError(f"{root}: no samples to show")
    out_png = Path(out_png)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)
    return out_png


def _tile(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    rgb = np.repeat((image * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if mask is not None:  # outline the foreground mask in green
        edge = mask ^ np.roll(mask, 1, 0) | mask ^ np.roll(mask, 1, 1)
        rgb[edge] = (0, 200, 0)
    return np.asarray(Image.fromarray(rgb).resize((TILE, TILE), Image.BILINEAR))


def inspect(root, out_png=None) -> str:
    manifest = read_manifest(root)
    text = summary(manifest)
    sheet = contact_sheet(root, out_png or Path(root) / "contact-sheet.png")
    return f"{text}\ncontact sheet: {sheet}"
