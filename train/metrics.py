"""SSIM, PSNR and MAE of translations against ground truth: the one definition used by validation, the
evaluator and the dashboard. Images are in [0,1] (data range 1). SSIM uses an 11x11 Gaussian window
(sigma 1.5); masked SSIM averages the SSIM map inside the foreground mask; masked PSNR and MAE use the
mean squared / absolute error inside the mask.

Texture is the ratio of high-frequency energy, translation over truth, inside the mask: the RMS of the
5-point Laplacian of each. 1 is the truth's texture; above 1 is speckle or noise the truth does not have,
below 1 is over-smoothing.

Brightness is each slice's mean inside the mask over the truth's: its mean over slices, weighted by head area,
is the translation's calibration, and its std how far the brightness strays from slice to slice. It is summed
(brightness_sums) so that validation can add it up over batches and ranks; a slice without head has no weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]


def laplacian_energy(images: torch.Tensor, weights: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Mean squared 5-point Laplacian of (N,1,H,W) images inside `weights`, per image."""
    lap = F.conv2d(images, LAPLACIAN.to(images), padding=1)
    return (lap.square() * weights).sum(dim=(1, 2, 3)) / area


def slice_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-slice metrics. pred/target: (N,1,H,W) in [0,1]; mask: (N,1,H,W) bool. Returns (N,) tensors."""
    pred, target = pred.float().clamp(0, 1), target.float()
    weights = mask.float()
    area = weights.sum(dim=(1, 2, 3)).clamp(min=1)
    ssim, ssim_map = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none", return_full_image=True)
    error = pred - target
    mse_masked = (error.square() * weights).sum(dim=(1, 2, 3)) / area
    lap_pred, lap_truth = laplacian_energy(pred, weights, area), laplacian_energy(target, weights, area)
    return {
        "ssim": ssim,
        "ssim_masked": (ssim_map * weights).sum(dim=(1, 2, 3)) / area,
        "psnr": peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "psnr_masked": 10 * torch.log10(1.0 / mse_masked.clamp(min=1e-10)),
        "mae_masked": (error.abs() * weights).sum(dim=(1, 2, 3)) / area,
        "mse_masked": mse_masked,
        "texture": (lap_pred / lap_truth.clamp(min=1e-12)).sqrt(),
        "mean_pred": (pred * weights).sum(dim=(1, 2, 3)) / area,
        "mean_truth": (target * weights).sum(dim=(1, 2, 3)) / area,
        "lap_pred": lap_pred,  # with lap_truth, lets a caller pool the texture ratio over slices
        "lap_truth": lap_truth,
        "mask_area": area,  # with the above, lets a caller pool slices into per-volume figures
    }


def brightness_sums(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """(sum a(r-1), sum a(r-1)^2, sum a) over slice_metrics' slices, r a slice's mean inside the head over the
    truth's and a its head area (0 where the truth's head is black). Centred on 1, the truth's, so that a float32
    sum keeps a small spread."""
    area = metrics["mask_area"] * (metrics["mean_truth"] > 0)
    excess = metrics["mean_pred"] / metrics["mean_truth"].clamp(min=1e-12) - 1
    return torch.stack([(area * excess).sum(), (area * excess.square()).sum(), area.sum()])


def brightness(sums: torch.Tensor) -> dict[str, float | None]:
    """brightness_sums (added up over any batches) -> the area-weighted mean and std of the ratio over slices;
    None for both where no slice had a head."""
    excess, square, area = (float(v) for v in sums)
    if area == 0:
        return {"mean": None, "std": None}
    return {"mean": 1 + excess / area, "std": math.sqrt(max(square / area - (excess / area) ** 2, 0.0))}
