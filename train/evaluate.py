"""Paired evaluation of both directions on a test (or val) split, reported per subject as papers do.

    python -m train.evaluate --checkpoint RUN/checkpoints/step-NNNNNNN --data SHARDS/test --out DIR [--overwrite]

Per slice, the same metrics as the trainer's validation (train/metrics.py: data range 1, SSIM with an 11x11
Gaussian window, σ 1.5, inside the head mask). Per subject, slices are pooled over the mask: masked SSIM is
the mean of the SSIM map over all the subject's masked pixels, PSNR comes from the mean squared error over
them, MAE likewise. Across subjects: mean ± std. `slice_mean` repeats the trainer's per-slice averages, so
evaluating the val split reproduces the logged validation.

DIR gets report.json, report.csv (one row per subject), report.md and figure.png (worst, median and best
slice per direction: input | translation | ground truth | |error| x4).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from shards.format import decode_sample
from train import rundir
from train.inference import CheckpointError, device_for_inference, load_generator, translate
from train.metrics import slice_metrics

DIRECTIONS = (("t1_to_t2", "t1", "t2"), ("t2_to_t1", "t2", "t1"))
POOLED = ("ssim_masked", "psnr_masked", "mae_masked")
SLICE = ("ssim", "ssim_masked", "psnr", "psnr_masked", "mae_masked")
ERROR_GAIN = 4  # |error| is drawn x4 so small errors show


def split_shards(folder: Path) -> list[str]:
    paths = sorted(str(p) for p in folder.glob("paired-*.tar"))
    if not folder.is_dir():
        raise SystemExit(f"error: --data {folder}: no such folder")
    if not paths:
        raise SystemExit(f"error: --data {folder}: no paired-*.tar shards; pass a split folder such as SHARDS/test")
    return paths


def read_samples(paths: list[str]):
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for raw in dataset:
        sample = decode_sample(raw)
        if not {"t1", "t2", "mask"} <= set(sample):
            raise SystemExit(f"error: {sample['key']} in {raw.get('__url__')}: a paired sample needs t1.png, t2.png and mask.png")
        yield sample


def batched(iterable, n):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def score(nets: dict, paths: list[str], batch_size: int, device: torch.device) -> dict:
    """Per-slice metrics for both directions, streamed (a test split does not fit in memory at 256²)."""
    rows = {name: [] for name, _, _ in DIRECTIONS}
    for chunk in batched(read_samples(paths), batch_size):
        tensors = {k: torch.from_numpy(np.stack([s[k] for s in chunk]))[:, None].to(device) for k in ("t1", "t2", "mask")}
        for name, source, target in DIRECTIONS:
            metrics = slice_metrics(translate(nets[name], tensors[source]), tensors[target], tensors["mask"])
            for i, sample in enumerate(chunk):
                rows[name].append({"key": sample["key"], "subject": sample["meta"]["subject"],
                                   **{k: float(v[i]) for k, v in metrics.items()}})
    return rows


def per_subject(rows: list[dict]) -> list[dict]:
    subjects = {}
    for row in rows:
        subjects.setdefault(row["subject"], []).append(row)
    out = []
    for subject, slices in sorted(subjects.items()):
        area = np.array([r["mask_area"] for r in slices])
        pooled = lambda key: float((np.array([r[key] for r in slices]) * area).sum() / area.sum())  # noqa: E731
        out.append({"subject": subject, "slices": len(slices), "ssim_masked": pooled("ssim_masked"),
                    "psnr_masked": float(10 * np.log10(1.0 / max(pooled("mse_masked"), 1e-10))), "mae_masked": pooled("mae_masked")})
    return out


def mean_std(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def figure(nets: dict, paths: list[str], rows: dict, device: torch.device) -> np.ndarray:
    """Worst, median and best slice by masked SSIM, per direction."""
    picks = {}
    for name, _, _ in DIRECTIONS:
        ranked = sorted(rows[name], key=lambda r: r["ssim_masked"])
        for label, row in zip(("worst", "median", "best"), (ranked[0], ranked[len(ranked) // 2], ranked[-1])):
            picks.setdefault(row["key"], []).append((name, label))
    samples = {s["key"]: s for s in read_samples(paths) if s["key"] in picks}
    grid_rows = []
    for name, source, target in DIRECTIONS:
        for label in ("worst", "median", "best"):
            key = next(k for k, tags in picks.items() if (name, label) in tags)
            s = samples[key]
            pred = translate(nets[name], torch.from_numpy(s[source])[None, None].to(device))[0, 0].cpu().numpy()
            error = np.clip(np.abs(pred - s[target]) * ERROR_GAIN, 0, 1) * s["mask"]
            grid_rows.append([s[source], pred, s[target], error])
    return rundir.prediction_grid(grid_rows)


def report_markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}` (step {report['step']})", "",
             f"{report['subjects']} subjects, {report['slices']} slices from `{report['data']}`. Per subject, pooled inside "
             "the head mask; mean ± std across subjects.", "",
             "| direction | masked SSIM | masked PSNR (dB) | masked MAE |", "|---|---|---|---|"]
    for name, _, _ in DIRECTIONS:
        s = report["directions"][name]["summary"]
        lines.append(f"| {name.replace('_', ' ').replace('t1', 'T1').replace('t2', 'T2')} | {s['ssim_masked']['mean']:.3f} ± "
                     f"{s['ssim_masked']['std']:.3f} | {s['psnr_masked']['mean']:.2f} ± {s['psnr_masked']['std']:.2f} | "
                     f"{s['mae_masked']['mean']:.4f} ± {s['mae_masked']['std']:.4f} |")
    lines += ["", "figure.png: per direction the worst, median and best slice by masked SSIM; columns input, translation, "
              f"ground truth, |error| x{ERROR_GAIN}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoints/step-NNNNNNN, or a run folder for its best checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="a split folder of paired shards, e.g. SHARDS/test")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} already exists; pass --overwrite to replace it")
    paths = split_shards(args.data)
    device = device_for_inference()
    try:
        loaded = {name: load_generator(args.checkpoint, name, device) for name, _, _ in DIRECTIONS}
    except CheckpointError as err:
        raise SystemExit(f"error: --checkpoint {err}")

    nets = {name: net for name, (net, _) in loaded.items()}
    checkpoint = loaded["t1_to_t2"][1]["path"]
    rows = score(nets, paths, args.batch_size, device)
    if not rows["t1_to_t2"]:
        raise SystemExit(f"error: --data {args.data}: the shards hold no samples")
    report = {"checkpoint": checkpoint, "step": loaded["t1_to_t2"][1].get("step"), "data": str(args.data),
              "subjects": len({r["subject"] for r in rows["t1_to_t2"]}), "slices": len(rows["t1_to_t2"]), "directions": {}}
    for name, _, _ in DIRECTIONS:
        subjects = per_subject(rows[name])
        report["directions"][name] = {
            "summary": {k: mean_std([s[k] for s in subjects]) for k in POOLED},
            "slice_mean": {k: float(np.mean([r[k] for r in rows[name]])) for k in SLICE},
            "subjects": subjects}

    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    with open(tmp / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "slices", *[f"{name}_{k}" for name, _, _ in DIRECTIONS for k in POOLED]])
        by_direction = {name: {s["subject"]: s for s in report["directions"][name]["subjects"]} for name, _, _ in DIRECTIONS}
        for subject in sorted(by_direction["t1_to_t2"]):
            writer.writerow([subject, by_direction["t1_to_t2"][subject]["slices"],
                             *[f"{by_direction[name][subject][k]:.6f}" for name, _, _ in DIRECTIONS for k in POOLED]])
    buf = io.BytesIO()
    Image.fromarray(figure(nets, paths, rows, device)).save(buf, format="PNG")
    (tmp / "figure.png").write_bytes(buf.getvalue())
    (tmp / "report.md").write_text(report_markdown(report))
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.replace(args.out)
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
