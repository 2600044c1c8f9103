"""A procedural 3D head phantom in world (RAS, mm) coordinates, rendered as T1- or T2-weighted MRI.

One `Anatomy` is drawn per subject; its tissue map is a function of world position, so a subject's T1 and T2
are the same anatomy sampled on two different voxel grids. Structures: scalp with a fat layer, skull with
marrow, CSF, a folded cortical grey-matter ribbon, white matter, deep grey matter, lateral ventricles, an
interhemispheric fissure, cerebellum with folia, brainstem, eyes and sinuses. Optionally, focal white-matter
lesions (dark on T1, bright on T2, like MS plaques or oedema) for the fidelity test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

AIR, SOFT, FAT, BONE, MARROW, CSF, GM, WM, DEEP_GM, VITREOUS, LESION = range(11)

# relative signal per tissue: T1 has WM > GM > CSF, T2 has CSF > GM > WM
CONTRAST_LUT = {
    "T1": np.array([0.0, 0.45, 1.0, 0.05, 0.70, 0.15, 0.55, 0.85, 0.66, 0.12, 0.38], np.float32),
    "T2": np.array([0.0, 0.35, 0.75, 0.05, 0.50, 1.00, 0.70, 0.45, 0.60, 0.95, 0.88], np.float32),
}

# IXI's three hospitals: scanner gain, contrast gamma, noise (fraction of gain) and bias-field strength differ.
# "bias" is the std of the field's log-polynomial coefficients; over a head the field's max/min is then about
# 1.15 (Guys), 1.35 (HH) and 1.2 (IOP), BrainWeb's 20-40% intensity non-uniformity.
SITES = {
    "Guys": {"gain": 800.0, "gamma": 0.95, "noise": 0.020, "bias": 0.025},  # Philips 1.5T
    "HH": {"gain": 1400.0, "gamma": 1.10, "noise": 0.015, "bias": 0.05},  # Philips 3T
    "IOP": {"gain": 600.0, "gamma": 1.00, "noise": 0.030, "bias": 0.03},  # GE 1.5T
}


@dataclass
class Anatomy:
    """Per-subject shape parameters; everything the tissue map depends on."""

    scale: np.ndarray  # (3,) head size factors
    rotation: np.ndarray  # (3,3) head pose in the scanner
    shift: np.ndarray  # (3,) mm
    ventricle_scale: float
    cortex_depth: float  # mm of grey matter above white matter at a gyral crown
    gyri_k: np.ndarray  # (K,3) wave vectors of the folding field, rad/mm
    gyri_phase: np.ndarray  # (K,)
    lesions: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (L,4) head-coord centre mm, radius mm

    @classmethod
    def random(cls, rng: np.random.Generator, components: int = 14) -> Anatomy:
        angles = np.deg2rad(rng.uniform(-5, 5, size=3))
        directions = rng.normal(size=(components, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelength = rng.uniform(22.0, 34.0, size=(components, 1))  # gyral spacing, mm
        return cls(
            scale=rng.uniform(0.92, 1.06, size=3),
            rotation=_rotation(*angles),
            shift=rng.uniform(-4, 4, size=3),
            ventricle_scale=float(rng.uniform(0.7, 1.5)),
            cortex_depth=float(rng.uniform(2.5, 3.5)),
            gyri_k=(2 * np.pi / wavelength) * directions,
            gyri_phase=rng.uniform(0, 2 * np.pi, size=components),
        )

    def to_world(self, p: np.ndarray) -> np.ndarray:
        """Head coordinates -> world (RAS mm); the inverse of the mapping at the top of tissue_labels."""
        return (p * self.scale) @ self.rotation.T + self.shift

    def with_lesions(self, rng: np.random.Generator, count: int, radius_mm=(3.0, 8.0)) -> Anatomy:
        """The same anatomy with `count` spherical lesions centred in cerebral white matter."""
        lesions = []
        for _ in range(1000):
            if len(lesions) == count:
                break
            centre = rng.uniform(-1, 1, size=3) * (40, 55, 35) + (0, 0, 14)
            if tissue_labels(self.to_world(centre)[None], self)[0] == WM:
                lesions.append((*centre, rng.uniform(*radius_mm)))
        return replace(self, lesions=np.array(lesions, np.float32).reshape(-1, 4))


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_depth(p: np.ndarray, center, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid surface: negative inside."""
    axes = np.asarray(axes, np.float32)
    rho = np.linalg.norm((p - np.asarray(center, np.float32)) / axes, axis=-1)
    return (rho - 1.0) * axes.mean()


def tissue_labels(world: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Tissue label per world point. world: (..., 3) RAS mm."""
    shape = world.shape[:-1]
    p = ((world.reshape(-1, 3) - anatomy.shift) @ anatomy.rotation) / anatomy.scale  # into head coordinates
    p = p.astype(np.float32)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]

    cerebrum = _ellipsoid_depth(p, (0, 0, 12), (64, 84, 62))
    cerebellum = _ellipsoid_depth(p, (0, -50, -32), (50, 32, 22))
    stem_xy = np.hypot(x / 11.0, (y + 20) / 13.0)
    brainstem = np.where(z < -5, (stem_xy - 1.0) * 12.0, np.maximum((stem_xy - 1.0) * 12.0, z + 5))
    brain = np.minimum(np.minimum(cerebrum, cerebellum), brainstem)
    head = np.where(z > -55, _ellipsoid_depth(p, (0, 2, 5), (80, 102, 95)), (np.hypot(x / 55, (y + 5) / 60) - 1) * 57)

    labels = np.full(p.shape[0], AIR, np.uint8)
    labels[head < 0] = SOFT
    labels[(head > -5) & (head < -1.5)] = FAT  # subcutaneous fat of the scalp
    skull = (brain >= 3) & (brain < 10)
    labels[skull] = BONE
    labels[skull & (brain >= 5) & (brain < 8)] = MARROW
    labels[brain < 3] = CSF

    eye = np.minimum(_ellipsoid_depth(p, (32, 66, -22), (12, 12, 12)), _ellipsoid_depth(p, (-32, 66, -22), (12, 12, 12)))
    labels[(eye < 5) & (labels == SOFT)] = FAT  # orbital fat
    labels[eye < 0] = VITREOUS
    labels[(_ellipsoid_depth(p, (0, 58, -48), (14, 24, 16)) < 0) & (brain > 10)] = AIR  # sinuses

    # cerebral cortex: a folding field g sets how deep grey matter reaches; a thin level set of g carves sulci
    g = np.cos(p @ anatomy.gyri_k.T.astype(np.float32) + anatomy.gyri_phase.astype(np.float32)).sum(1)
    g *= np.float32(np.sqrt(2.0 / anatomy.gyri_k.shape[0]))
    depth = -cerebrum
    in_cerebrum = depth > 0
    # sulci follow the zero set of g: there white matter recedes, grey matter lines the walls and CSF fills the centre
    sulcus = np.clip(1.0 - np.abs(g) / 0.5, 0, 1)
    wm_depth = anatomy.cortex_depth + 14.0 * sulcus
    labels[in_cerebrum] = WM
    labels[in_cerebrum & (depth < wm_depth)] = GM
    labels[in_cerebrum & (sulcus > 0.8) & (depth < wm_depth - 2.0)] = CSF
    # interhemispheric fissure everywhere on the midline except through the corpus callosum
    callosum = (np.abs(y + 4) < 36) & (z > 8) & (z < 20 + 0.004 * y**2)
    labels[in_cerebrum & ~callosum & (z > 18 - 0.01 * y**2) & (np.abs(x) < 1.5 + anatomy.cortex_depth)] = GM
    labels[in_cerebrum & ~callosum & (z > 20 - 0.01 * y**2) & (np.abs(x) < 1.2)] = CSF

    deep = np.minimum(
        np.minimum(_ellipsoid_depth(p, (18, 8, 4), (7, 14, 10)), _ellipsoid_depth(p, (-18, 8, 4), (7, 14, 10))),
        np.minimum(_ellipsoid_depth(p, (10, -12, 8), (8, 12, 9)), _ellipsoid_depth(p, (-10, -12, 8), (8, 12, 9))),
    )
    labels[in_cerebrum & (deep < 0)] = DEEP_GM
    vs = anatomy.ventricle_scale
    bend = z - 18 + 0.008 * y**2  # ventricles arch over the thalami
    for side in (-1, 1):
        lateral = x - side * (3.0 + 4.0 * vs + 0.1 * np.maximum(y + 10, 0))  # frontal horns meet near the midline
        horn = _ellipsoid_depth(np.stack([lateral, y + 6, bend], -1), (0, 0, 0), (5.0 * vs, 28, 7 * vs))
        labels[in_cerebrum & (horn < 0)] = CSF

    # cerebellum: grey folia around a white-matter core; brainstem is white matter
    in_cb = (cerebellum < 0) & (cerebrum > 0)
    labels[in_cb] = WM
    labels[in_cb & ((cerebellum > -7) | (np.sin(cerebellum * 1.6) > 0.1))] = GM
    labels[in_cb & (np.sin(cerebellum * 1.6) > 0.85) & (cerebellum > -9)] = CSF
    labels[(brainstem < 0) & (cerebrum > 0) & (cerebellum > 0)] = WM
    for *centre, radius in anatomy.lesions:  # lesions replace white matter only, so they never cross the cortex
        inside = np.linalg.norm(p - np.asarray(centre, np.float32), axis=-1) < radius
        labels[inside & (labels == WM)] = LESION
    return labels.reshape(shape)


def voxel_world(shape, affine: np.ndarray, slab: slice) -> np.ndarray:
    """World coordinates (RAS mm) of the voxel centres in shape[0] slab `slab`."""
    i, j, k = np.meshgrid(np.arange(shape[0])[slab], np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(np.float32)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _slabs(shape, affine: np.ndarray, slab_size: int = 32):
    """(slab, world coordinates of its voxels) along shape[0], a slab at a time to bound memory."""
    for start in range(0, shape[0], slab_size):
        slab = slice(start, min(start + slab_size, shape[0]))
        yield slab, voxel_world(shape, affine, slab)


def tissue_volume(anatomy: Anatomy, shape, affine: np.ndarray) -> np.ndarray:
    """uint8 tissue labels of `anatomy` on the voxel grid (shape, affine); `== LESION` is its lesion mask."""
    labels = np.empty(shape, np.uint8)
    for slab, world in _slabs(shape, affine):
        labels[slab] = tissue_labels(world, anatomy)
    return labels


def bias_field(world: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field: exp of a quadratic polynomial in world position (units of 100 mm)."""
    x, y, z = np.moveaxis(world / 100.0, -1, 0)
    terms = np.stack([x, y, z, x * y, x * z, y * z, x * x, y * y, z * z], -1)
    return np.exp(terms @ coefficients.astype(np.float32))


def render(labels: np.ndarray, contrast: str, site: str, affine: np.ndarray, rng: np.random.Generator,
           voxels_averaged: float = 1.0) -> np.ndarray:
    """MR magnitude image (int16, scanner units) of a tissue volume from `tissue_volume` on its grid.
    `voxels_averaged`: each voxel stands for this many of the site's native voxels, so its noise is the
    native noise / sqrt(voxels_averaged), as if the native image had been block-averaged."""
    params = SITES[site]
    lut = CONTRAST_LUT[contrast] ** params["gamma"]
    coefficients = rng.normal(scale=params["bias"], size=9)
    shape = labels.shape
    image = np.empty(shape, np.float32)
    for slab, world in _slabs(shape, affine):
        image[slab] = lut[labels[slab]] * bias_field(world, coefficients)
    ndimage.gaussian_filter(image, sigma=0.6, output=image)  # partial-volume blur
    sigma = params["noise"] / np.sqrt(voxels_averaged)
    image = np.hypot(image + rng.normal(scale=sigma, size=shape).astype(np.float32),
                     rng.normal(scale=sigma, size=shape).astype(np.float32))  # Rician magnitude noise
    return np.clip(image * params["gain"], 0, 32767).astype(np.int16)
