"""Rigid registration of a subject's T2 onto its T1, before paired val/test slices are cut (SimpleITK).

Real IXI T1 and T2 are separate acquisitions minutes apart: the head moves between them, so the scanner
coordinates of the two headers agree only roughly. `register_rigid` finds the 6-parameter rigid transform that
maps T1 world positions onto the same anatomy in T2, by Mattes mutual information (the two contrasts have
different intensities for the same tissue), over three resolutions, starting from the headers' own world
coordinates (the identity). Transforms are 4x4 matrices in RAS millimetres, the convention of the NIfTI
affines in this project; SimpleITK works in LPS, converted at the edges.

`check` is the documented quality test (docs/shards.md): a subject whose registration fails it is not paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .head import head_threshold

# Resolution levels in mm: coarse first (captures large motion), finest sets the accuracy. A level below the
# image's own voxel size runs at the voxel size.
LEVELS_MM = (8.0, 4.0, 2.0)
HISTOGRAM_BINS = 32
SAMPLING = 0.25  # share of the head voxels the metric samples per iteration (random, seeded)
SAMPLING_SEED = 1  # SimpleITK reads a seed of 0 (sitkWallClock) as "seed from the clock": packing would not repeat
ITERATIONS = 200

# The quality check. Head motion between two series of one session stays well inside these bounds; a
# transform beyond them is the optimiser lost in a wrong minimum, not a head that moved.
MAX_ROTATION_DEG = 20.0
MAX_TRANSLATION_MM = 40.0
MIN_MASK_DICE = 0.9  # head masks of T1 and registered T2 on the paired grid

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


@dataclass
class Registration:
    matrix: np.ndarray  # 4x4, RAS mm: a T1 world position -> the same anatomy's T2 world position
    metric: float  # final Mattes mutual information (negative: lower is better)
    iterations: int
    head: np.ndarray  # (N, 3) RAS mm: T1's head at the finest level's voxels, where displacements are measured

    @property
    def rotation_deg(self) -> float:
        cosine = (np.trace(self.matrix[:3, :3]) - 1) / 2
        return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))

    def displacement_mm(self) -> np.ndarray:
        """How far the transform moves each point of the head."""
        return np.linalg.norm(apply(self.matrix, self.head) - self.head, axis=1)

    def record(self, mask_dice: float) -> dict:
        """The manifest's per-subject entry."""
        moved = self.displacement_mm()
        return {"method": "rigid", "transform_ras": np.round(self.matrix, 6).tolist(), "rotation_deg": round(self.rotation_deg, 3),
                "mean_displacement_mm": round(float(moved.mean()), 3), "max_displacement_mm": round(float(moved.max()), 3),
                "mutual_information": round(self.metric, 5), "iterations": self.iterations, "mask_dice": round(mask_dice, 4)}


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A float32 SimpleITK image with the geometry of a RAS voxel->world affine (shear, if any, removed)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(affine[:3, :3] / spacing)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS[:3, :3] @ (u @ vt)).ravel().tolist())
    image.SetOrigin((LPS[:3, :3] @ affine[:3, 3]).tolist())
    return image


def _head(image: sitk.Image) -> sitk.Image:
    """A sampling mask: voxels above 10% of the bright end, enclosed holes (skull, sinuses) filled."""
    threshold = head_threshold(sitk.GetArrayViewFromImage(image))
    return sitk.BinaryFillhole(sitk.Cast(image > threshold, sitk.sitkUInt8))


def _points(mask: sitk.Image) -> np.ndarray:
    """RAS mm positions of a mask's voxels."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask))[:, ::-1]  # numpy's (z, y, x) -> ITK's (x, y, z)
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    lps = (index * np.array(mask.GetSpacing())) @ direction.T + np.array(mask.GetOrigin())
    return lps @ LPS[:3, :3]


def register_rigid(t1: np.ndarray, t1_affine: np.ndarray, t2: np.ndarray, t2_affine: np.ndarray,
                  seed: int = SAMPLING_SEED) -> Registration:
    """T2 onto T1: the rigid transform, rotating about T1's head centre, that maximises mutual information
    over T1's head. The same inputs and seed (not 0) give the same transform, whatever the thread count."""
    if seed == sitk.sitkWallClock:
        raise ValueError(f"seed {seed} is SimpleITK's wall-clock seed: the registration would not repeat")
    # everything runs at or above the finest level's voxel size: averaging down to it first makes it cheap
    fixed, moving = (sitk.BinShrink(to_sitk(data, affine), [max(1, int(LEVELS_MM[-1] / mm)) for mm in np.linalg.norm(affine[:3, :3], axis=0)])
                     for data, affine in ((t1, t1_affine), (t2, t2_affine)))
    mask = _head(fixed)
    head = _points(mask)
    initial = sitk.Euler3DTransform()
    initial.SetCenter((LPS[:3, :3] @ head.mean(0)).tolist())  # identity: the headers' world coordinates

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, seed)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([max(1, int(round(level / min(fixed.GetSpacing())))) for level in LEVELS_MM])
    method.SetSmoothingSigmasPerLevel([level / 2 for level in LEVELS_MM])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    iterations = [0]
    method.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
    found = method.Execute(fixed, moving)
    # SimpleITK's transform maps fixed (T1) points to moving (T2) points, in LPS
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0))
    lps = np.eye(4)
    lps[:3, :3] = np.array(euler.GetMatrix()).reshape(3, 3)
    centre = np.array(euler.GetCenter())
    lps[:3, 3] = np.array(euler.GetTranslation()) + centre - lps[:3, :3] @ centre
    return Registration(LPS @ lps @ LPS, float(method.GetMetricValue()), iterations[0], head)


def check(registration: Registration, mask_dice: float) -> str | None:
    """None when the registration passes the quality check; else the reason it fails."""
    if registration.rotation_deg > MAX_ROTATION_DEG:
        return f"registration rotated {registration.rotation_deg:.1f} degrees, more than the {MAX_ROTATION_DEG:g} a head moves (MAX_ROTATION_DEG)"
    moved = float(registration.displacement_mm().max())
    if moved > MAX_TRANSLATION_MM:
        return f"registration moved the head up to {moved:.1f} mm, more than the {MAX_TRANSLATION_MM:g} a head moves (MAX_TRANSLATION_MM)"
    if mask_dice < MIN_MASK_DICE:
        return f"after registration the T1 and T2 head masks overlap with Dice {mask_dice:.3f}, below {MIN_MASK_DICE} (MIN_MASK_DICE)"
    return None
