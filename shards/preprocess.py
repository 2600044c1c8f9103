"""One volume or image in, normalized axial slices out.

Volumes are resampled (trilinear, in world coordinates, so any orientation works) onto an axis-aligned RAS
grid of `fov_mm / size` mm voxels centred on the head; at the default 256 mm field of view and size 256 that
is the common 1 mm grid. Slices are stored in neurological convention: anterior up, patient's left on the
image's left. Intensities are clipped to the foreground's 0.5 and 99.5 percentiles and scaled to [0,1].
"""

from __future__ import annotations

import io
import math
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .bias import BIAS_CORRECTION, correct_n4
from .head import head_threshold

PERCENTILES = (0.5, 99.5)
MIN_SLICE_FOREGROUND = 0.2  # keep axial slices whose head area is at least this share of the largest one


class VolumeError(ValueError):
    """A volume or image that cannot be used; the message says why."""


@dataclass
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> RAS mm


# What one file may cost, checked before anything is allocated: a header's claim is never trusted.
MAX_VOXELS = 2**27  # 512^3 voxels; float32 is 512 MiB (IXI's volumes hold 10 M)
MAX_IMAGE_PIXELS = 2**26  # 8192 x 8192
MAX_FILE_BYTES = MAX_VOXELS * 8 + 2**20  # the largest volume as float64, plus header and extensions
# The axial grid has one slice per grid spacing of the volume's extent, so the extent a header claims bounds it
# too: a metre along any world axis, where head scans (IXI's) span 150-260 mm.
MAX_EXTENT_MM = 1000.0
NIFTI1_HEADER_BYTES = 348


def read_file(path) -> bytes:
    """A file's bytes, refused before reading when it is larger than any usable volume could be."""
    size = os.stat(path).st_size
    if size > MAX_FILE_BYTES:
        raise VolumeError(f"{size} bytes: larger than the {MAX_FILE_BYTES // 2**20} MiB a volume may take (MAX_FILE_BYTES)")
    with open(path, "rb") as f:
        return f.read()


def _nifti_header(head: bytes) -> tuple[nib.Nifti1Header, int]:
    """The header of .nii bytes and the number of bytes the file must hold, checked against MAX_VOXELS."""
    if len(head) < NIFTI1_HEADER_BYTES:
        raise VolumeError(f"not a NIfTI-1 file: {len(head)} bytes, shorter than its {NIFTI1_HEADER_BYTES}-byte header")
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head[:NIFTI1_HEADER_BYTES]), check=True)
        shape, dtype, offset = header.get_data_shape(), header.get_data_dtype(), int(header["vox_offset"])
    except Exception as err:  # nibabel raises several kinds on a garbage header; all mean the same here
        raise VolumeError(f"not a usable NIfTI-1 header ({type(err).__name__}: {err})") from err
    voxels = math.prod(int(n) for n in shape)  # Python ints: a hostile header cannot overflow this
    if voxels > MAX_VOXELS:
        raise VolumeError(f"the header claims {'x'.join(map(str, shape))} voxels, more than the {MAX_VOXELS} a volume may "
                          f"have (MAX_VOXELS)")
    return header, max(offset, NIFTI1_HEADER_BYTES) + voxels * dtype.itemsize


def _decompress(data: bytes) -> tuple[bytes, nib.Nifti1Header, int]:
    """.nii bytes from .nii or .nii.gz bytes, inflating no more than the header says the volume needs; with the
    header and the bytes it needs."""
    if data[:2] != b"\x1f\x8b":
        return (data, *_nifti_header(data))
    try:
        stream = zlib.decompressobj(wbits=31)  # gzip framing
        head = stream.decompress(data, NIFTI1_HEADER_BYTES)
        header, needed = _nifti_header(head)
        return head + stream.decompress(stream.unconsumed_tail, needed - len(head)), header, needed
    except zlib.error as err:
        raise VolumeError(f"corrupt gzip data ({err})") from err


def load_nifti(data: bytes) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(float32 3D data, affine, zooms) from .nii or .nii.gz bytes; raises VolumeError on anything unusable.
    Memory stays bounded by MAX_VOXELS whatever the header claims or the gzip stream holds."""
    raw, header, needed = _decompress(data)
    if len(raw) < needed:
        raise VolumeError(f"truncated: the header promises {needed} bytes, the file holds {len(raw)}")
    try:
        image = nib.Nifti1Image.from_bytes(raw[:needed])
        array = np.asarray(image.dataobj, dtype=np.float32)
        affine = image.affine
    except Exception as err:  # a header that passed the checks can still hold a datatype that makes no image
        raise VolumeError(f"corrupt NIfTI ({type(err).__name__}: {err})") from err
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got {array.ndim}D with shape {array.shape}")
    check_geometry(array.shape, affine)
    check_intensities(array)
    return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), affine, header.get_zooms()[:3]


def load_image(data: bytes) -> np.ndarray:
    """A 2D image (PNG/JPG/TIFF, RGB or grayscale, 8 or 16 bit) as a float32 (H, W) array; at most MAX_IMAGE_PIXELS."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # the size comes from the header: nothing is decoded yet
                raise VolumeError(f"{im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} an image may have (MAX_IMAGE_PIXELS)")
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                im = im.convert("L")
            array = np.asarray(im, dtype=np.float32)
    except VolumeError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own cap, higher than ours, fires while opening
        raise VolumeError(f"more pixels than the {MAX_IMAGE_PIXELS} an image may have (MAX_IMAGE_PIXELS; {err})") from err
    except Exception as err:  # Pillow raises many kinds on a damaged file; all mean the same here
        raise VolumeError(f"not a readable image ({type(err).__name__}: {err})") from err
    if array.ndim != 2:
        raise VolumeError(f"expected a 2D grayscale or RGB image, got shape {array.shape}")
    check_intensities(array)
    return np.nan_to_num(array)


def check_geometry(shape: tuple[int, ...], affine: np.ndarray) -> None:
    """A voxel-to-world affine that can be worked in: not degenerate, and not spreading the voxels over more than
    MAX_EXTENT_MM (a 16 KB file whose voxels are 10 m apart would otherwise ask the resampling for gigabytes)."""
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise VolumeError("the voxel-to-world affine is degenerate (zero or infinite voxel axes): no orientation to work in")
    extent = np.abs(affine[:3, :3]) @ (np.asarray(shape[:3], dtype=float) - 1)
    if extent.max() > MAX_EXTENT_MM:
        raise VolumeError(f"the voxel-to-world affine spreads the volume over {' x '.join(f'{e:.0f}' for e in extent)} mm, more than "
                          f"the {MAX_EXTENT_MM:.0f} mm a scan may span (MAX_EXTENT_MM): are the voxel sizes in the header right?")


def check_intensities(array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if finite.all():  # the usual case, without copying the finite voxels out
        if not array.any():
            raise VolumeError("all voxels are zero")
        return
    if not finite.any():
        raise VolumeError("all voxels are NaN or infinite")
    if not np.any(array[finite] != 0):
        raise VolumeError("all voxels are NaN, infinite or zero")


def head_centre(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position (mm) of the centroid of voxels brighter than the background."""
    coarse = data[::4, ::4, ::4]
    weights = coarse > head_threshold(coarse)
    ijk = np.argwhere(weights).mean(0) * 4
    return affine[:3, :3] @ ijk + affine[:3, 3]


def axial_grid(data: np.ndarray, affine: np.ndarray, size: int, fov_mm: float) -> Grid:
    """RAS grid: size x size in-plane voxels of fov_mm/size mm centred on the head, isotropic slices covering
    the volume's extent along S."""
    spacing = fov_mm / size
    corners = np.array([[i, j, k, 1] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1) for k in (0, data.shape[2] - 1)])
    z_world = (affine @ corners.T)[2]
    nz = int(np.floor((z_world.max() - z_world.min()) / spacing)) + 1
    centre = head_centre(data, affine)
    grid_affine = np.diag([spacing, spacing, spacing, 1.0])
    grid_affine[:3, 3] = [centre[0] - spacing * (size - 1) / 2, centre[1] - spacing * (size - 1) / 2, z_world.min()]
    return Grid((size, size, nz), grid_affine)


def resample(data: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Trilinear resampling of `data` (voxel->world `affine`) onto `grid`; zero outside the input. Where the
    grid's axes run along the volume's (IXI's scans, any unrotated header) it is three 1D interpolations, a
    fraction of the time of sampling in 3D."""
    to_source = np.linalg.inv(affine) @ grid.affine  # grid voxel -> source voxel
    axes = _source_axes(to_source[:3, :3])
    if axes is None:
        return _sample_3d(data, to_source, grid.shape)
    # source axes in grid order, copied so each interpolation gathers contiguous rows (NIfTI data is
    # Fortran-ordered: gathering through the transposed view cost more than this copy)
    out = np.ascontiguousarray(data.transpose(axes))
    for g, source_axis in enumerate(axes):
        out = _interpolate_axis(out, g, to_source[source_axis, g] * np.arange(grid.shape[g]) + to_source[source_axis, 3])
    return np.ascontiguousarray(out, dtype=np.float32)


def _sample_3d(data: np.ndarray, to_source: np.ndarray, shape: tuple[int, int, int], slab: int = 16) -> np.ndarray:
    """Trilinear sampling at grid voxels mapped into the source by `to_source`, `slab` output planes at a time."""
    source = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))[None, None]  # (1,1,K,J,I): x is last
    # grid_sample wants coordinates normalised to [-1, 1] with align_corners=True
    norm = np.diag([2.0 / max(s - 1, 1) for s in data.shape] + [1.0])
    norm[:3, 3] = -1.0
    m = torch.from_numpy((norm @ to_source).astype(np.float32))
    nx, ny, nz = shape
    out = np.empty(shape, np.float32)
    i, j = torch.meshgrid(torch.arange(nx, dtype=torch.float32), torch.arange(ny, dtype=torch.float32), indexing="ij")
    for start in range(0, nz, slab):
        k = torch.arange(start, min(start + slab, nz), dtype=torch.float32)
        ijk = torch.stack([i[None].expand(len(k), -1, -1), j[None].expand(len(k), -1, -1), k[:, None, None].expand(-1, nx, ny)], -1)
        coords = ijk @ m[:3, :3].T + m[:3, 3]  # (K, nx, ny, 3), in source (i, j, k) order = grid_sample's (x, y, z)
        sampled = F.grid_sample(source, coords[None], mode="bilinear", padding_mode="zeros", align_corners=True)
        out[:, :, start:start + len(k)] = sampled[0, 0].permute(1, 2, 0).numpy()
    return out


def _source_axes(linear: np.ndarray) -> tuple[int, int, int] | None:
    """For each grid axis, the one source axis it moves along; None when the grid is oblique to the source.
    A header's float32 rotation leaves terms near 1e-7 off the axes: at 1e-6 they move a sample 3e-4 voxels."""
    moves = np.abs(linear) > 1e-6 * np.abs(linear).max()
    if not ((moves.sum(0) == 1).all() and (moves.sum(1) == 1).all()):
        return None
    return tuple(int(a) for a in moves.argmax(0))


def _interpolate_axis(volume: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of `volume` along `axis` at voxel positions `coords`; zero beyond its ends, as
    grid_sample's zero padding is (a corner outside the volume counts as zero)."""
    n = volume.shape[axis]
    low = np.floor(coords).astype(np.int64)
    frac = (coords - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = len(coords)
    w_low = ((1 - frac) * ((low >= 0) & (low < n))).reshape(shape)
    w_high = (frac * ((low + 1 >= 0) & (low + 1 < n))).reshape(shape)
    out = np.take(volume, np.clip(low, 0, n - 1), axis)
    out *= w_low
    high = np.take(volume, np.clip(low + 1, 0, n - 1), axis)
    high *= w_high
    out += high
    return out


def inside(shape: tuple[int, int, int], affine: np.ndarray, grid: Grid, voxels: np.ndarray) -> np.ndarray:
    """Which of `grid`'s (N, 3) `voxels` lie within a volume of `shape` under `affine` (its field of view)."""
    to_source = np.linalg.inv(affine) @ grid.affine
    ijk = voxels @ to_source[:3, :3].T + to_source[:3, 3]
    return np.all((ijk >= -0.5) & (ijk <= np.array(shape) - 0.5), axis=1)


_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # connect within an axial slice only


def _head_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of `mask`. Holes and components are the same in it as in the whole volume (background
    at the box's edge meets the background beyond it, which reaches the slice's border), and labelling the box
    alone costs about half."""
    in_plane, along = mask.any(axis=2), np.flatnonzero(mask.any(axis=(0, 1)))
    xs, ys = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    return slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(along[0], along[-1] + 1)


def foreground(data: np.ndarray) -> np.ndarray:
    """Head mask: bright voxels, holes (skull, sinuses) filled slice by slice, largest 3D component kept."""
    bright = data > head_threshold(data)
    if not bright.any():
        return bright
    box = _head_box(bright)
    mask = bright[box]
    # a hole is background not connected, within its slice, to the slice's border; one labelling does all slices
    background, _ = ndimage.label(~mask, _IN_PLANE)
    outside = np.zeros(background.max() + 1, bool)  # by label: touches its slice's border
    outside[np.concatenate([background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(), background[:, -1].ravel()])] = True
    mask |= ~outside[background]
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels[mask])  # head voxels only, so label 0 counts none
        mask = labels == sizes.argmax()
    head = np.zeros_like(bright)
    head[box] = mask
    return head


def standardize(data: np.ndarray, affine: np.ndarray, size: int, fov_mm: float, bias_correction: str = "none",
                grid: Grid | None = None) -> tuple[Grid, np.ndarray, np.ndarray, dict]:
    """What every volume goes through before a model sees it, in `shards pack` and at inference alike:
    bias-field correction ("n4" or "none"), resampling onto the axial RAS grid (built from this volume when
    `grid` is None), head mask, foreground-percentile normalization. Returns (grid, normalized, mask,
    normalization record)."""
    if bias_correction == "n4":
        data = correct_n4(data, affine, foreground(data))
    elif bias_correction != "none":
        raise ValueError(f"unknown bias correction {bias_correction!r}: choose one of {BIAS_CORRECTION}")
    grid = grid or axial_grid(data, affine, size, fov_mm)
    resampled = resample(data, affine, grid)
    mask = foreground(resampled)
    normalized, norm = normalize(resampled, mask)
    return grid, normalized, mask, norm


def standardize_image(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """What every 2D image goes through, in `shards pack` and at inference alike: fitted into size x size
    (aspect kept, padded), head mask, foreground-percentile normalization. Returns (normalized, mask,
    normalization record), each (size, size)."""
    fitted = fit_image(image, size)[:, :, None]
    mask = foreground(fitted)
    normalized, norm = normalize(fitted, mask)
    return normalized[:, :, 0], mask[:, :, 0], norm


def normalize(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict]:
    if not mask.any():
        raise VolumeError("no foreground found")
    low, high = np.percentile(data[mask], PERCENTILES)
    if high <= low:
        raise VolumeError("foreground has no intensity range (constant image)")
    # in float32: numpy's float64 percentiles would promote the whole volume to float64 and back (3x the time)
    scaled = data.astype(np.float32) - np.float32(low)
    scaled /= np.float32(high - low)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return scaled, {"method": "foreground-percentile", "percentiles": list(PERCENTILES), "low": float(low), "high": float(high)}


def kept_slices(mask: np.ndarray) -> np.ndarray:
    area = mask.sum(axis=(0, 1))
    return np.flatnonzero(area >= MIN_SLICE_FOREGROUND * area.max()) if area.max() > 0 else np.array([], int)


def to_image(plane: np.ndarray) -> np.ndarray:
    """RAS (x, y) plane -> image rows/cols in neurological convention (anterior up, left on the left)."""
    return np.ascontiguousarray(plane[:, ::-1].T)


def from_image(image: np.ndarray) -> np.ndarray:
    """The inverse of to_image: image rows/cols -> RAS (x, y) plane."""
    return np.ascontiguousarray(image.T[:, ::-1])


def fit_image(array: np.ndarray, size: int) -> np.ndarray:
    """Scale a 2D image to fit size x size, keeping its aspect ratio, and pad with zeros."""
    h, w = array.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(array, mode="F").resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def unfit_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of fit_image: crop the padding and scale back to `shape`."""
    h, w = shape
    size = image.shape[0]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    crop = np.ascontiguousarray(image[top:top + nh, left:left + nw], dtype=np.float32)
    return np.asarray(Image.fromarray(crop, mode="F").resize((w, h), Image.BILINEAR))
