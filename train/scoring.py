"""Scoring translations against paired truth: read paired shards, translate every slice, compute the per-slice
metrics (train/metrics.py), pool them per subject, and measure lesions. The library under train.evaluate's
report and the fidelity benches; it writes nothing.

Per subject, slices are pooled over the head mask: masked SSIM is the mean of the SSIM map over all the
subject's masked pixels, PSNR comes from the mean squared error over them, MAE likewise. Across subjects:
mean ± std. `slice_mean` repeats the trainer's per-slice averages. Brightness is the exception, taken over
slices: each slice's mean inside the head over the truth's, weighted by head area; its mean is the
translation's calibration, its std how far the brightness strays from slice to slice (banding across a
volume's slices, inconsistency across a set of 2D slices), which per-subject pooling would average away.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from shards.format import ShardsError, check_complete, decode_samples, recorded_samples
from train import rundir
from train.fidelity import lesion_contrasts, lesion_summary, stack_subject, translate_with_map
from train.metrics import brightness, brightness_sums, slice_metrics

POOLED = ("ssim_masked", "psnr_masked", "mae_masked", "texture")
SLICE = ("ssim", "ssim_masked", "psnr", "psnr_masked", "mae_masked", "texture")


class ScoringError(ValueError):
    """Paired shards that cannot be scored; the message names the folder or shard."""


def split_shards(folder: Path) -> list[str]:
    paths = sorted(str(p) for p in folder.glob("paired-*.tar"))
    if not folder.is_dir():
        raise ScoringError(f"{folder}: no such folder")
    if not paths:
        raise ScoringError(f"{folder}: no paired-*.tar shards; pass a split folder such as SHARDS/test")
    return paths


def read_samples(paths: list[str], allow_partial: bool = False, check: bool = True):
    """Every paired sample of `paths`, decoded; with `check`, once all are read, each shard's count is checked
    against its manifest (an error naming the shard, or a warning with `allow_partial`)."""
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    counted = dict.fromkeys(paths, 0)
    try:
        for sample in decode_samples(dataset):
            if not {"t1", "t2", "mask"} <= set(sample):
                raise ScoringError(f"{sample['key']} in {sample['url']}: a paired sample needs t1.png, t2.png and mask.png")
            counted[sample["url"]] += 1
            yield sample
        if check:
            check_complete(counted, allow_partial, warn=lambda message: print(message, file=sys.stderr))
    except ShardsError as err:
        raise ScoringError(str(err)) from None


def batched(iterable, n):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def score(nets: dict, paths: list[str], batch_size: int, device: torch.device, maps: dict | None = None,
          detectors: dict | None = None, allow_partial: bool = False) -> tuple[dict, dict]:
    """Per-slice metrics for both directions, streamed (a test split does not fit in memory at 256²).
    With `maps`, feeds each direction's ErrorDetection. Also returns, per direction and lesion subject, the
    slices that hold lesions, with their translations."""
    rows = {name: [] for name in rundir.DIRECTIONS}
    lesion_slices = {name: {} for name in rundir.DIRECTIONS}
    recorded = [recorded_samples(path) for path in paths]
    bar = tqdm(total=None if None in recorded else sum(recorded), desc="evaluate", unit="slice")
    for chunk in batched(read_samples(paths, allow_partial), batch_size):
        bar.update(len(chunk))
        tensors = {k: torch.from_numpy(np.stack([s[k] for s in chunk]))[:, None].to(device) for k in ("t1", "t2", "mask")}
        for name, (source, target) in rundir.DIRECTIONS.items():
            pred, spread = translate_with_map(nets[name], tensors[source], maps[name] if maps else None)
            if spread is not None:
                detectors[name].update(spread, pred, tensors[target], tensors["mask"])
            metrics = slice_metrics(pred, tensors[target], tensors["mask"])
            for i, sample in enumerate(chunk):
                rows[name].append({"key": sample["key"], "subject": sample["meta"]["subject"],
                                   **{k: float(v[i]) for k, v in metrics.items()}})
                if "lesion" in sample and sample["lesion"].any():
                    lesion_slices[name].setdefault(sample["meta"]["subject"], []).append(
                        {"z": sample["meta"]["slice"], "lesion": sample["lesion"], "mask": sample["mask"],
                         "input": sample[source], "pred": pred[i, 0].cpu().numpy(), "truth": sample[target],
                         **({"map": spread[i, 0].cpu().numpy()} if spread is not None else {})})
    bar.close()
    return rows, lesion_slices


def lesion_report(lesion_slices: dict) -> dict:
    """Per direction: lesion metrics over all lesion subjects (docs/fidelity.md)."""
    report = {}
    for name, subjects in lesion_slices.items():
        lesions, errors = [], []
        for slices in subjects.values():
            stacked = stack_subject(slices)
            lesions += lesion_contrasts(stacked["lesion"], stacked["mask"], {"pred": stacked["pred"], "truth": stacked["truth"]},
                                        stacked.get("map"))
            errors.append(np.abs(stacked["pred"] - stacked["truth"])[stacked["lesion"]])
        if lesions:
            report[name] = {"subjects": len(subjects), **lesion_summary(lesions, errors)}
    return report


def per_subject(rows: list[dict]) -> list[dict]:
    subjects = {}
    for row in rows:
        subjects.setdefault(row["subject"], []).append(row)
    out = []
    for subject, slices in sorted(subjects.items()):
        area = np.array([r["mask_area"] for r in slices])

        def pooled(key, slices=slices, area=area):  # weighted by head area
            return float((np.array([r[key] for r in slices]) * area).sum() / area.sum())

        out.append({"subject": subject, "slices": len(slices), "ssim_masked": pooled("ssim_masked"),
                    "psnr_masked": float(10 * np.log10(1.0 / max(pooled("mse_masked"), 1e-10))), "mae_masked": pooled("mae_masked"),
                    "texture": float(np.sqrt(pooled("lap_pred") / max(pooled("lap_truth"), 1e-12)))})
    return out


def mean_std(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def rows_brightness(rows: list[dict]) -> dict:
    """train.metrics.brightness over per-slice rows."""
    return brightness(brightness_sums({k: torch.tensor([r[k] for r in rows], dtype=torch.float64)
                                       for k in ("mean_pred", "mean_truth", "mask_area")}))


def summarize(rows: list[dict]) -> dict:
    """One direction's per-slice rows -> its summary across subjects (POOLED: mean and std; brightness over
    slices), the per-slice means (SLICE) and the per-subject rows."""
    subjects = per_subject(rows)
    return {"summary": {**{k: mean_std([s[k] for s in subjects]) for k in POOLED}, "brightness": rows_brightness(rows)},
            "slice_mean": {k: float(np.mean([r[k] for r in rows])) for k in SLICE},
            "subjects": subjects}
