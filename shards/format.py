"""The shard format: the one contract between `shards`, the trainer, the evaluator and the dashboard.

Layout of a shards folder (documented in docs/shards.md):

    DIR/manifest.json
    DIR/train/t1-000000.tar ...   unpaired T1 slices
    DIR/train/t2-000000.tar ...   unpaired T2 slices
    DIR/val/paired-000000.tar ... aligned T1+T2 slices with a foreground mask
    DIR/test/paired-000000.tar ...

Each sample is `<subject>_z<NNN>` with members `t1.png` and/or `t2.png` (16-bit grayscale, [0,1] scaled
to [0,65535]), `mask.png` (8-bit, 0/255) in paired samples, `lesion.png` (8-bit, 0/255) in paired samples of
subjects packed with a lesion mask, and `json` (subject, site, contrasts, slice, spacing_mm, normalization).
Plain `webdataset.WebDataset` reads them without this package.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
# stream name per split: train is unpaired (one stream per contrast), val/test are paired
STREAMS = {"train": ("t1", "t2"), "val": ("paired",), "test": ("paired",)}
CONTRASTS = ("t1", "t2")
SHARD_RE = re.compile(r"^(t1|t2|paired)-(\d{6})\.tar$")
PNG16_MAX = 65535
# Pillow tries five filters on every row; one Sub filter with run-length deflate gives MR slices the same size
# (within 2%) in a quarter of the time; it was about a quarter of packing (docs/benchmarks.md). Decoding stays Pillow's.
_FAST_PNG = {"level": imagecodecs.PNG.COMPRESSION.SPEED, "strategy": imagecodecs.PNG.STRATEGY.RLE, "filter": imagecodecs.PNG.FILTER.SUB}


def shard_name(stream: str, index: int) -> str:
    return f"{stream}-{index:06d}.tar"


def sample_key(subject: str, z: int) -> str:
    return f"{subject}_z{z:03d}"


def key_subject(key: str) -> str:
    """The subject of a sample key: sample_key's inverse."""
    return key.rsplit("_z", 1)[0]


def safe_subject(name: str) -> str:
    """Subject ids become tar member prefixes: webdataset splits keys at the first '.', so keep [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "subject"


def shard_paths(root: str | os.PathLike, split: str, stream: str) -> list[str]:
    """Sorted shard files of one stream, e.g. shard_paths(d, 'train', 't1')."""
    folder = Path(root) / split
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if SHARD_RE.match(p.name) and p.name.startswith(stream + "-"))


def encode_png16(image: np.ndarray) -> bytes:
    """[0,1] float image -> 16-bit grayscale PNG bytes (no 8-bit quantization)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {image.shape}")
    scaled = np.round(np.clip(image, 0.0, 1.0) * PNG16_MAX).astype(np.uint16)
    return imagecodecs.png_encode(scaled, **_FAST_PNG)


def decode_png16(data: bytes, size: int | None = None) -> np.ndarray:
    """16-bit PNG bytes -> float32 image in [0,1]; with `size`, any other size is refused from the header, before
    the pixels are decoded."""
    with Image.open(io.BytesIO(data)) as im:
        _check_size(im, size)
        if im.mode not in ("I;16", "I"):
            raise ValueError(f"expected a 16-bit grayscale PNG, got mode {im.mode}")
        array = np.asarray(im)
    return array.astype(np.float32) / PNG16_MAX


def encode_mask(mask: np.ndarray) -> bytes:
    return imagecodecs.png_encode((mask > 0).astype(np.uint8) * 255, **_FAST_PNG)


def decode_mask(data: bytes, size: int | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        _check_size(im, size)
        return np.asarray(im) > 127


def _check_size(im: Image.Image, size: int | None) -> None:
    if size and im.size != (size, size):
        raise ValueError(f"a {im.width}x{im.height} image where the slices are {size}x{size}")


def encode_sample(key: str, images: dict[str, np.ndarray], meta: dict, mask: np.ndarray | None = None,
                  lesion: np.ndarray | None = None) -> dict:
    """Build a webdataset sample dict of bytes. `images` maps contrast ('t1'/'t2') to a [0,1] slice."""
    sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
    for contrast, image in images.items():
        sample[f"{contrast}.png"] = encode_png16(image)
    if mask is not None:
        sample["mask.png"] = encode_mask(mask)
    if lesion is not None:
        sample["lesion.png"] = encode_mask(lesion)
    return sample


def decode_sample(sample: dict, size: int | None = None) -> dict:
    """Raw webdataset sample (bytes per member) -> {'key', 'meta', 't1'/'t2': float32 [0,1], 'mask'/'lesion': bool}.
    Every image and mask must be size x size; without `size`, the sample's first image sets it."""
    out = {"key": sample["__key__"], "meta": json.loads(sample["json"])}
    for contrast in CONTRASTS:
        if f"{contrast}.png" in sample:
            out[contrast] = decode_png16(sample[f"{contrast}.png"], size)
            size = size or _square_side(out[contrast])
    for name in ("mask", "lesion"):
        if f"{name}.png" in sample:
            out[name] = decode_mask(sample[f"{name}.png"], size)
    return out


def _square_side(image: np.ndarray) -> int:
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image where slices are square")
    return image.shape[0]


def decode_samples(raw_samples) -> Iterator[dict]:
    """Decoded samples of a stream (webdataset's raw dicts), each with the 'url' of its shard and the size of the
    first: a damaged sample, or one of another size, is a ShardsError naming its shard and key."""
    size = None
    for raw in raw_samples:
        try:
            sample = decode_sample(raw, size)
        except Exception as err:  # Pillow and json raise many kinds on damaged bytes; all mean the same here
            raise ShardsError(f"{raw.get('__url__')}: sample {raw.get('__key__')} is unreadable ({type(err).__name__}: {err})") from err
        size = size or next((sample[c].shape[0] for c in CONTRASTS if c in sample), None)
        yield {**sample, "url": raw.get("__url__")}


class ShardsError(ValueError):
    """A shards folder that does not hold what the format promises."""


def shards_preprocessing(manifest: dict, size: int | None = None) -> dict:
    """How a shards folder's volumes were prepared, for preparing a new volume the same way at inference
    (shards.preprocess.standardize takes these; checkpoints record them as `preprocessing`)."""
    return {"fov_mm": manifest["options"]["fov_mm"], "size": size or manifest["image_size"], "normalization": manifest["normalization"],
            "bias_correction": manifest["options"].get("bias_correction", "none")}


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardsError(f"{path}: no manifest.json; is {root} a folder written by `python -m shards pack`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested deeper than the parser goes
        raise ShardsError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardsError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def recorded_samples(path: str | os.PathLike, manifests: dict | None = None) -> int | None:
    """The samples a shard's manifest records for it (`shard_samples`); None for a shard outside a packed folder or
    from a manifest without the counts. `manifests` caches the manifests read, by folder."""
    manifests = {} if manifests is None else manifests
    root = Path(path).parent.parent
    if root not in manifests:
        try:
            manifests[root] = read_manifest(root)
        except ShardsError:
            manifests[root] = None
    return ((manifests[root] or {}).get("splits", {}).get(Path(path).parent.name, {}).get("shard_samples", {})).get(Path(path).name)


def check_complete(counted: dict[str, int], allow_partial: bool = False, warn=print) -> None:
    """Each shard read whole (`counted`: path -> samples seen) holds the samples its manifest's `shard_samples`
    records. A shard cut short at a member boundary reads without an error; this is what notices. Shards
    outside a packed folder, or from a manifest without the counts, are not checked."""
    manifests: dict[Path, dict | None] = {}
    for path, seen in counted.items():
        expected = recorded_samples(path, manifests)
        if expected is not None and seen != expected:
            message = (f"{path}: holds {seen} samples, but {Path(path).parent.parent / MANIFEST} records {expected}; the shard "
                       f"is truncated or was replaced")
            if not allow_partial:
                raise ShardsError(message + " (pass --allow-partial to go on with what is there)")
            warn(f"WARNING: {message}; going on with {seen} (--allow-partial)")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name, then rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
