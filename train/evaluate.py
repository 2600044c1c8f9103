"""Paired evaluation of both directions on a test (or val) split, reported per subject as papers do.

    python -m train.evaluate --checkpoint RUN/checkpoints/step-NNNNNNN [MORE ...] --data SHARDS/test [SHARDS/val] --out DIR
                             [--overwrite] [--tta]

Per slice, the same metrics as the trainer's validation (train/metrics.py: data range 1, SSIM with an 11x11
Gaussian window, σ 1.5, inside the head mask), pooled per subject by train/scoring.py (masked SSIM is the mean
of the SSIM map over all the subject's masked pixels, PSNR comes from the mean squared error over them, MAE
likewise). Across subjects: mean ± std. `slice_mean` repeats the trainer's per-slice averages, so evaluating
the val split reproduces the logged validation (with --tta where the run validated with --val_tta).
With --tta each translation is the mean of 10 flipped and shifted copies (train/inference.py). Several
checkpoints (independently trained runs) are scored as their ensemble: each translation is the mean of theirs.

DIR gets report.json, report.csv (one row per subject), report.md and figure.png (worst, median and best
slice per direction: input | translation | ground truth | |error| x4 [| hallucination map x4]) and, where
the shards carry lesion masks, lesions.png (per direction the slice with the most lesion pixels, the same
columns and its lesion mask).

Fidelity (train/fidelity.py, docs/fidelity.md): with `--uncertainty tta|cycle|ensemble|aleatoric` the report adds how
well the hallucination map flags pixels with |error| > --error-threshold (AUROC); where the shards carry
lesion masks, it adds lesion metrics (visible fraction, lesion-to-ring contrast against the truth, MAE) and,
with a map, how many lesions the map flags.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train import rundir, tracking
from train.fidelity import FLAGGED_RANK, MODES, ErrorDetection, HallucinationMap, translate_with_map
from train.inference import ENSEMBLE_HELP, TTA_HELP, CheckpointError, device_for_inference, load_translator
from train.scoring import POOLED, ScoringError, lesion_report, read_samples, score, split_shards, summarize

ERROR_GAIN = 4  # |error| is drawn x4 so small errors show


def figure(nets: dict, paths: list[str], rows: dict, device: torch.device, maps: dict | None = None) -> np.ndarray:
    """Worst, median and best slice by masked SSIM, per direction; with `maps`, the hallucination map too."""
    picks = {}
    for name in rundir.DIRECTIONS:
        ranked = sorted(rows[name], key=lambda r: r["ssim_masked"])
        for label, row in zip(("worst", "median", "best"), (ranked[0], ranked[len(ranked) // 2], ranked[-1])):
            picks.setdefault(row["key"], []).append((name, label))
    samples = {s["key"]: s for s in read_samples(paths, check=False) if s["key"] in picks}  # score() checked the counts
    grid_rows = []
    for name, (source, target) in rundir.DIRECTIONS.items():
        for label in ("worst", "median", "best"):
            key = next(k for k, tags in picks.items() if (name, label) in tags)
            s = samples[key]
            image = torch.from_numpy(s[source])[None, None].to(device)
            pred, spread = translate_with_map(nets[name], image, maps[name] if maps else None)
            grid_rows.append(figure_row(s[source], pred[0, 0].cpu().numpy(), s[target], s["mask"],
                                        None if spread is None else spread[0, 0].cpu().numpy()))
    return rundir.prediction_grid(grid_rows)


def lesion_figure(lesion_slices: dict) -> np.ndarray | None:
    """Per direction, the slice with the most lesion pixels, as figure() draws a slice plus its lesion mask;
    None without lesions."""
    grid_rows = []
    for subjects in lesion_slices.values():
        slices = [s for per_subject in subjects.values() for s in per_subject]
        if slices:
            s = max(slices, key=lambda s: s["lesion"].sum())
            grid_rows.append([*figure_row(s["input"], s["pred"], s["truth"], s["mask"], s.get("map")), s["lesion"].astype(np.float32)])
    return rundir.prediction_grid(grid_rows) if grid_rows else None


def figure_row(source: np.ndarray, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, spread: np.ndarray | None) -> list:
    """input, translation, truth, |error| and the map (both amplified, inside the head)."""
    row = [source, pred, truth, np.clip(np.abs(pred - truth) * ERROR_GAIN, 0, 1) * mask]
    if spread is not None:
        row.append(np.clip(spread * ERROR_GAIN, 0, 1) * mask)
    return row


def brightness_cell(brightness: dict) -> str:
    """train.metrics.brightness (a report's summary.brightness) as a table cell: mean ± std over slices, or - where no slice had a head."""
    return "-" if brightness["mean"] is None else f"{brightness['mean']:.3f} ± {brightness['std']:.3f}"


def report_markdown(report: dict) -> str:
    members = report.get("members", [])
    lines = [f"# Evaluation of `{report['checkpoint']}` (step {report['step']})"
             + (f" in an ensemble of {len(members)}: " + ", ".join(f"`{m}`" for m in members[1:]) if members else ""), "",
             f"{report['subjects']} subjects, {report['slices']} slices from `{report['data']}`. Per subject, pooled inside "
             "the head mask; mean ± std across subjects."
             + (" Translations: the mean of 10 flipped and shifted copies (--tta)." if report["tta"] else ""), "",
             "| direction | masked SSIM | masked PSNR (dB) | masked MAE | texture (Laplacian RMS vs truth) "
             "| brightness vs truth (mean ± std over slices) |", "|---|---|---|---|---|---|"]
    for name in rundir.DIRECTIONS:
        s = report["directions"][name]["summary"]
        lines.append(f"| {direction_label(name)} | {s['ssim_masked']['mean']:.3f} ± "
                     f"{s['ssim_masked']['std']:.3f} | {s['psnr_masked']['mean']:.2f} ± {s['psnr_masked']['std']:.2f} | "
                     f"{s['mae_masked']['mean']:.4f} ± {s['mae_masked']['std']:.4f} | "
                     f"{s['texture']['mean']:.2f} ± {s['texture']['std']:.2f} | {brightness_cell(s['brightness'])} |")
    if "uncertainty" in report:
        u = report["uncertainty"]
        lines += ["", f"Hallucination map `{u['mode']}`: AUROC for pixels with |error| > {u['error_threshold']} inside the head.", "",
                  "| direction | AUROC | pixels above the threshold |", "|---|---|---|"]
        for name in rundir.DIRECTIONS:
            d = u["directions"][name]
            auroc = "n/a (one class)" if d["auroc"] is None else f"{d['auroc']:.3f}"
            lines.append(f"| {direction_label(name)} | {auroc} | {100 * d['large_error_fraction']:.1f}% |")
    if report.get("lesions"):
        lines += ["", "Lesions (3D components of the lesion masks; contrast = lesion vs a 2-pixel ring of surrounding tissue):", "",
                  "| direction | subjects | lesions | visible | contrast: truth | translation | ratio | lesion MAE |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, d in report["lesions"].items():
            lines.append(f"| {direction_label(name)} | {d['subjects']} | {d['lesions']} | {100 * d['visible_fraction']:.0f}% | "
                         f"{d['contrast_truth']:+.3f} | {d['contrast_translation']:+.3f} | {d['contrast_ratio']:.2f} | {d['mae_lesion']:.4f} |")
        flagged = {name: d for name, d in report["lesions"].items() if "flagged_fraction" in d}
        if flagged:
            lines += ["", f"Hallucination map at the lesions (rank: the fraction of head pixels whose map is lower than the "
                      f"lesion's mean; flagged: rank >= {FLAGGED_RANK}):", "",
                      "| direction | mean map rank | lesions flagged | lost lesions flagged |", "|---|---|---|---|"]
            for name, d in flagged.items():
                lost = "-" if d["lost_flagged_fraction"] is None else f"{100 * d['lost_flagged_fraction']:.0f}%"
                lines.append(f"| {direction_label(name)} | {d['map_rank']:.2f} | {100 * d['flagged_fraction']:.0f}% | {lost} |")
    columns = f"input, translation, ground truth, |error| x{ERROR_GAIN}" + (f", hallucination map x{ERROR_GAIN}" if "uncertainty" in report else "")
    lines += ["", f"figure.png: per direction the worst, median and best slice by masked SSIM; columns {columns}."]
    if report.get("lesions"):
        lines.append(f"lesions.png: per direction the slice with the most lesion pixels; columns {columns}, lesion mask.")
    lines.append("")
    return "\n".join(lines)


REPORT_FILES = ("report.json", "report.csv", "report.md", "figure.png", "lesions.png")


def check_replaceable(out: Path) -> None:
    """--overwrite replaces a report folder this tool wrote, never a folder of someone's files."""
    if not out.is_dir() or out.is_symlink():
        raise SystemExit(f"error: --out {out} is not a report folder (a file or a link); refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
    if foreign or not (out / "report.json").is_file():
        raise SystemExit(f"error: --out {out} holds files train.evaluate did not write ({', '.join(foreign[:3]) or 'no report.json'}); "
                         f"refusing to replace it with --overwrite: choose another --out")


def direction_label(name: str) -> str:
    return name.replace("_", " ").replace("t1", "T1").replace("t2", "T2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="RUN/checkpoints/step-NNNNNNN, or a run folder for its best checkpoint; " + ENSEMBLE_HELP)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="split folders of paired shards, e.g. SHARDS/test")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder (one that holds only what "
                        "train.evaluate writes; any other folder is refused)")
    parser.add_argument("--allow-partial", action="store_true", help="go on, with a warning, when a shard holds fewer samples "
                        "than its manifest records (default: an error naming the shard)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", action="store_true", help=TTA_HELP)
    parser.add_argument("--uncertainty", choices=MODES, default=None,
                        help="add a hallucination map and its AUROC for large errors (docs/fidelity.md)")
    parser.add_argument("--error-threshold", type=float, default=0.1,
                        help="|error| above which a pixel counts as wrong for the AUROC, in [0,1] intensity units")
    parser.add_argument("--report_to", "--report-to", choices=["wandb", "none"], default="wandb",
                        help="add the report to the W&B run that trained the checkpoint, where it had one (mode as in training: "
                        "$WANDB_MODE, else online with a login, else offline into the run folder; default: wandb)")
    args = parser.parse_args(argv)

    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} already exists; pass --overwrite to replace it")
    if args.out.exists():
        check_replaceable(args.out)
    try:
        paths = [path for folder in args.data for path in split_shards(folder)]
    except ScoringError as err:
        raise SystemExit(f"error: --data {err}")
    device = device_for_inference()
    try:
        loaded = {name: load_translator(args.checkpoint, name, device, args.tta) for name in rundir.DIRECTIONS}
        nets = {name: translator for name, (translator, _) in loaded.items()}
        maps = {name: HallucinationMap(args.uncertainty, nets[name], args.checkpoint, name, device, back=nets[rundir.REVERSE[name]])
                for name in rundir.DIRECTIONS} if args.uncertainty else None
    except CheckpointError as err:
        raise SystemExit(f"error: --checkpoint {err}")

    checkpoint = loaded["t1_to_t2"][1]["path"]
    detectors = {name: ErrorDetection(args.error_threshold) for name in rundir.DIRECTIONS}
    try:
        rows, lesion_slices = score(nets, paths, args.batch_size, device, maps, detectors, args.allow_partial)
    except ScoringError as err:
        raise SystemExit(f"error: {err}")
    if not rows["t1_to_t2"]:
        raise SystemExit(f"error: --data {' '.join(map(str, args.data))}: the shards hold no samples")
    members = {"members": loaded["t1_to_t2"][1]["members"]} if "members" in loaded["t1_to_t2"][1] else {}
    report = {"checkpoint": checkpoint, **members, "step": loaded["t1_to_t2"][1].get("step"), "data": " ".join(map(str, args.data)),
              "subjects": len({r["subject"] for r in rows["t1_to_t2"]}), "slices": len(rows["t1_to_t2"]), "tta": args.tta}
    report["directions"] = {name: summarize(rows[name]) for name in rundir.DIRECTIONS}
    if maps:
        report["uncertainty"] = {"mode": args.uncertainty, "error_threshold": args.error_threshold,
                                 "directions": {name: detectors[name].result() for name in rundir.DIRECTIONS}}
    report["lesions"] = lesion_report(lesion_slices)

    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    with open(tmp / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "slices", *[f"{name}_{k}" for name in rundir.DIRECTIONS for k in POOLED]])
        by_direction = {name: {s["subject"]: s for s in report["directions"][name]["subjects"]} for name in rundir.DIRECTIONS}
        for subject in sorted(by_direction["t1_to_t2"]):
            writer.writerow([subject, by_direction["t1_to_t2"][subject]["slices"],
                             *[f"{by_direction[name][subject][k]:.6f}" for name in rundir.DIRECTIONS for k in POOLED]])
    Image.fromarray(figure(nets, paths, rows, device, maps)).save(tmp / "figure.png")
    lesions = lesion_figure(lesion_slices)
    if lesions is not None:
        Image.fromarray(lesions).save(tmp / "lesions.png")
    (tmp / "report.md").write_text(report_markdown(report))
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.replace(args.out)
    print(report_markdown(report))
    recorded = loaded["t1_to_t2"][1].get("wandb")
    mode = tracking.wandb_mode(args.report_to, "")
    if recorded and mode != "disabled" and not members:
        run_id = tracking.log_evaluation(recorded, mode, Path(checkpoint).parent.parent, report, args.out / "figure.png")
        print(f"added to W&B run {run_id} ({mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
