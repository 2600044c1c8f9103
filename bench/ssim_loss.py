"""Where a checkpoint loses masked SSIM, on aligned pairs (docs/fidelity.md, "Where the last tenth of SSIM goes").

    python bench/ssim_loss.py --checkpoint RUN --data SHARDS/test SHARDS/val [--tta]

Per direction, the mean of the SSIM map over every head pixel (train/metrics.py's window: Gaussian 11x11,
sigma 1.5) split into its luminance term and its contrast-structure term, and the share of the loss (1 - SSIM)
that falls
  by depth into the head: pixels 0-3, 3-6, 6-10, 10-20 and over 20 from the mask's edge;
  by edge strength: the truth's smoothed gradient, below its median (the flat half), 50-80%, 80-95%, top 5%;
  by slice: its head area as a share of its subject's largest, under 50% (the top of the head and the skull
  base, the cerebellum and temporal lobes), 50-80% and over 80%.
Last, what an intensity mapping could still give: the SSIM after each subject's translation is remapped
through the per-intensity means of its own truth (64 bins, fitted on the subject itself: an upper bound).
If that remap gains little, the loss is in the anatomy's shapes, not in the contrast's calibration.
And in CSF (the true T2 above 0.85, eroded by a pixel), where T1->T2 is steepest and passed-on input noise shows
as mottled ventricles: the mean, and the high-pass std (the image minus its 1-pixel Gaussian blur) beside the
truth's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from train import rundir
from train.inference import load_translator, translate_slices
from train.scoring import read_samples, split_shards

C1, C2 = 0.01**2, 0.03**2  # SSIM's constants for data range 1
DEPTHS = ((0, 3, "0-3"), (3, 6, "3-6"), (6, 10, "6-10"), (10, 20, "10-20"), (20, np.inf, "over 20"))
EDGES = ((0.0, 0.5, "flat half"), (0.5, 0.8, "50-80%"), (0.8, 0.95, "80-95%"), (0.95, 1.0, "top 5%"))
SLICE_AREAS = ((0.0, 0.5, "under 50%"), (0.5, 0.8, "50-80%"), (0.8, 1.0, "over 80%"))
CSF_T2 = 0.85


def head_area_share(samples: list[dict]) -> np.ndarray:
    """Each slice's head area as a share of its subject's largest: what SLICE_AREAS splits by."""
    subjects = np.array([s["meta"]["subject"] for s in samples])
    area = np.array([(s["mask"] > 0).sum() for s in samples])
    return area / np.array([area[subjects == subject].max() for subject in subjects])


def gaussian_window(images: torch.Tensor) -> torch.Tensor:
    taps = torch.exp(-(torch.arange(11.0) - 5) ** 2 / (2 * 1.5**2))
    taps = taps / taps.sum()
    rows = F.conv2d(F.pad(images, (5, 5, 0, 0), mode="reflect"), taps.view(1, 1, 1, 11))
    return F.conv2d(F.pad(rows, (0, 0, 5, 5), mode="reflect"), taps.view(1, 1, 11, 1))


def ssim_terms(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM's luminance and contrast-structure maps; their product is the SSIM map."""
    mean_p, mean_t = gaussian_window(pred), gaussian_window(truth)
    var_p, var_t = gaussian_window(pred * pred) - mean_p**2, gaussian_window(truth * truth) - mean_t**2
    covariance = gaussian_window(pred * truth) - mean_p * mean_t
    return (2 * mean_p * mean_t + C1) / (mean_p**2 + mean_t**2 + C1), (2 * covariance + C2) / (var_p + var_t + C2)


def edge_strength(truth: np.ndarray) -> np.ndarray:
    """Gradient magnitude of (N,1,H,W) slices smoothed by a 1-pixel Gaussian: below its median over the head is
    the truth's flat half."""
    smooth = ndimage.gaussian_filter(truth, (0, 0, 1, 1))
    return np.hypot(ndimage.sobel(smooth, -1), ndimage.sobel(smooth, -2))


def remapped(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, bins: int = 64) -> np.ndarray:
    index = np.clip((pred * bins).astype(int), 0, bins - 1)
    means = [truth[mask & (index == b)].mean() if (mask & (index == b)).sum() > 20 else (b + 0.5) / bins for b in range(bins)]
    return np.asarray(means, np.float32)[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run folder (its best checkpoint) or a checkpoint folder")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="split folders of paired shards")
    parser.add_argument("--tta", action="store_true", help="score the mean of the 10 flipped and shifted copies")
    args = parser.parse_args()

    samples = list(read_samples([path for folder in args.data for path in split_shards(folder)]))
    subjects = np.array([s["meta"]["subject"] for s in samples])
    mask = np.stack([s["mask"] for s in samples])[:, None] > 0
    depth = np.stack([ndimage.distance_transform_edt(m[0]) for m in mask])[:, None]
    area_share = head_area_share(samples)
    csf = ndimage.binary_erosion(np.stack([s["t2"] for s in samples])[:, None] > CSF_T2, structure=np.ones((1, 1, 3, 3))) & mask
    for direction, (source, target) in rundir.DIRECTIONS.items():
        net = load_translator([args.checkpoint], direction, tta=args.tta)[0]
        truth = np.stack([s[target] for s in samples])[:, None]
        pred = torch.from_numpy(translate_slices(net, np.stack([s[source] for s in samples]), batch_size=32)).clamp(0, 1)[:, None]
        luminance, structure = (term.numpy() for term in ssim_terms(pred, torch.from_numpy(truth)))
        ssim = luminance * structure
        edge = edge_strength(truth)
        loss = (1 - ssim)[mask]
        print(f"{direction}: SSIM over head pixels {ssim[mask].mean():.4f} = luminance {luminance[mask].mean():.4f} "
              f"x contrast-structure {structure[mask].mean():.4f} (pixel means)")
        for low, high, name in DEPTHS:
            part = (depth[mask] > low) & (depth[mask] <= high)
            print(f"  {name:>7} px deep: {part.mean():6.1%} of pixels, {loss[part].sum() / loss.sum():6.1%} of the loss, "
                  f"SSIM {ssim[mask][part].mean():.3f}")
        cuts = np.quantile(edge[mask], [low for low, _, _ in EDGES] + [1.0])
        for (_, _, name), low, high in zip(EDGES, cuts[:-1], cuts[1:]):
            part = (edge[mask] >= low) & (edge[mask] <= high)
            print(f"  {name:>9}: {loss[part].sum() / loss.sum():6.1%} of the loss, SSIM {ssim[mask][part].mean():.3f}, "
                  f"contrast-structure {structure[mask][part].mean():.3f}")
        for low, high, name in SLICE_AREAS:
            part = (area_share > low) & (area_share <= high)
            pixels = mask & part[:, None, None, None]
            print(f"  slices with {name:>9} of the largest head: {part.sum()} slices, {(1 - ssim)[pixels].sum() / loss.sum():6.1%} "
                  f"of the loss, SSIM {ssim[pixels].mean():.3f}")
        pred_np = pred.numpy()
        high_pass = [(image - ndimage.gaussian_filter(image, (0, 0, 1, 1)))[csf].std() for image in (pred_np, truth)]
        print(f"  in CSF ({csf.sum()} pixels): mean {pred_np[csf].mean():.3f} (truth {truth[csf].mean():.3f}), high-pass std "
              f"{high_pass[0]:.4f} = {high_pass[0] / high_pass[1]:.2f} x the truth's")
        for subject in np.unique(subjects):
            rows = subjects == subject
            pred_np[rows] = remapped(pred_np[rows], truth[rows], mask[rows])
        luminance, structure = ssim_terms(torch.from_numpy(pred_np), torch.from_numpy(truth))
        print(f"  remapped through each subject's own per-intensity truth: SSIM {(luminance * structure).numpy()[mask].mean():.4f}")


if __name__ == "__main__":
    main()
