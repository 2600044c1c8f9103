"""Fidelity ablation: the seed's plain CycleGAN against structure-preserving variants, at one step budget, on
synthetic IXI with lesions and a held-out anatomy (docs/fidelity.md).

    python bench/fidelity_bench.py [--out bench-out/fidelity] [--subjects 30] [--split 0.8,0.1,0.1] [--size 128] [--steps 3000]
                                   [--anatomy phantom|template]
                                   [--variants plain mind10-lsgan-cyc5-unet3-subpixel-equiv10-warm500-full16-augstartauto-geom]
                                   [--uncertainty tta] [--tta]
                                   [--seed 0] [--train-seed N] [--snapshots N] [--ensemble N] [--train-subjects N]

Stages: `shards synth --lesions --holdout-anatomy` (downsample 256/size) -> `shards pack --lesions --holdout`
-> per variant `train/main.py` -> `train.evaluate --uncertainty` on val+test, which hold every lesion and
held-out subject and no training subject. With --ensemble N, each variant is trained with N training seeds
and their last checkpoints are scored as one ensemble. A single run's last checkpoint is scored, and where
validation picked an earlier one, that best checkpoint too (its own row: over-training shows as a better best).
For a small training set, --train-subjects 5 (about 100 slices per contrast at 128²) trains on five of the
training subjects, drawn by the training seed, and scores the same val+test as the full runs beside it.
--anatomy template trains and scores on one real brain's anatomy instead (bench/template_brain.py: the MNI152
template's slices, no lesions). Existing stages in --out are reused. Prints one table of masked SSIM/PSNR,
texture, brightness against the truth (mean and spread over slices), the input noise each translation passes
and its cycle returns (train.fidelity.noise_transfer, on 64 of the scored slices), hallucination-map AUROC and
lesion metrics per variant and direction, and writes it to OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage

from demo_bounds import LookupTable  # bench/, the script's own folder
from template_brain import write_template_slices
from train import rundir
from train.evaluate import brightness_cell
from train.fidelity import MODES, RING_PIXELS, noise_transfer
from train.inference import load_translator
from train.scoring import lesion_report, read_samples, score, split_shards, summarize

ROOT = Path(__file__).resolve().parents[1]
SEED = ["--config", "train/recipes/seed.yaml"]
NGF, BATCH_SIZE = 32, 2  # the bench's network width and batch (the trainer's defaults too); a run at others is named for them
VARIANTS_FILE = Path(__file__).with_name("fidelity_variants.yaml")
# the trainer's defaults (tests/test_train.py checks it)
DEFAULT_VARIANT = "mind10-lsgan-cyc5-unet3-subpixel-equiv10-warm500-full16-augstartauto-geom"


def load_variants(path: Path = VARIANTS_FILE) -> dict[str, dict]:
    """Each variant's train/main.py options (on top of SEED): its base's, then its own."""
    listed = yaml.safe_load(path.read_text())

    def options(name: str, seen: tuple = ()) -> dict:
        if name in seen or name not in listed:
            raise ValueError(f"{path}: variant {name!r} is {'its own base' if name in seen else 'not listed'}")
        entry = listed[name]
        return {**(options(entry["base"], (*seen, name)) if "base" in entry else {}), **entry["options"]}

    return {name: options(name) for name in listed}


def flags(options: dict) -> list[str]:
    return [token for key, value in options.items() for token in (f"--{key}", str(value))]


VARIANTS = load_variants()


def run(*args, **kwargs) -> float:
    start = time.time()
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, **kwargs)
    return time.time() - start


def scored_samples(shards: Path) -> tuple[list[str], list[dict]]:
    """The shards every row is scored on (test, then val) and their samples, read once."""
    paths = [*split_shards(shards / "test"), *split_shards(shards / "val")]
    return paths, list(read_samples(paths))


def lookup_reference(paths: list[str], samples: list[dict]) -> dict:
    """bench/demo_bounds.py's per-intensity lookup table, as a report like train.evaluate's: fitted on the
    scored slices' head pixels away from every lesion (paired truth no CycleGAN gets: a generous reference for
    what a mapping without context keeps), then scored and lesion-measured by train.evaluate's own code."""
    images = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("t1", "t2", "mask")}
    lesions = np.stack([s.get("lesion", np.zeros_like(s["mask"])) for s in samples])
    near_lesion = ndimage.binary_dilation(lesions, np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool), iterations=RING_PIXELS + 1)
    fit = images["mask"] & ~torch.from_numpy(near_lesion)
    nets = {name: LookupTable(images[source], images[target], fit) for name, (source, target) in rundir.DIRECTIONS.items()}
    rows, lesion_slices = score(nets, paths, 32, torch.device("cpu"))
    return {"directions": {name: summarize(rows[name]) for name in rundir.DIRECTIONS},
            "lesions": lesion_report(lesion_slices)}


def noise_slices(samples: list[dict], count: int = 64) -> list[dict]:
    """`count` of the scored samples, spread evenly over them, for the noise-transfer figure."""
    return samples[::max(len(samples) // count, 1)][:count]


def noise_transfers(members: list[Path], slices: list[dict], tta: bool) -> dict:
    """train.fidelity.noise_transfer both ways: how much input noise each translation passes and its cycle returns."""
    mask = torch.from_numpy(np.stack([s["mask"] for s in slices]))[:, None]
    translators = {direction: load_translator(members, direction, tta=tta)[0] for direction in rundir.DIRECTIONS}
    return {direction: noise_transfer(translators[direction], translators[rundir.REVERSE[direction]],
                                      torch.from_numpy(np.stack([s[source] for s in slices]))[:, None], mask)
            for direction, (source, _) in rundir.DIRECTIONS.items()}


def run_name(args: argparse.Namespace, name: str, seed: int) -> str:
    """A variant's run folder, named for every setting that changes what it trains, so a rerun scores only its own run."""
    return (f"{name}-{args.size}-{args.steps}{'-template' * (args.anatomy == 'template')}{f'-seed{seed}' * (seed != args.seed)}"
            f"{f'-snap{args.snapshots}' * (args.snapshots > 1)}"
            f"{f'-{args.train_subjects}subjects' * (args.train_subjects > 0)}{f'-ngf{args.ngf}' * (args.ngf != NGF)}"
            f"{f'-batch{args.batch_size}' * (args.batch_size != BATCH_SIZE)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fidelity")
    parser.add_argument("--anatomy", choices=["phantom", "template"], default="phantom", help="phantom: --subjects synthetic "
                        "subjects with lesions; template: one real brain, the MNI152 template's slices (bench/template_brain.py: "
                        "93 train, 20 scored, no lesions; its own runs, NAME-SIZE-STEPS-template)")
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions of the subjects (shards pack --split)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="another batch size gets its own run folder, NAME-SIZE-STEPS-batchN")
    parser.add_argument("--ngf", type=int, default=NGF, help="generator and discriminator width; another gets its own run folder, "
                        "NAME-SIZE-STEPS-ngfN")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["plain", DEFAULT_VARIANT],
                        metavar="NAME", help=f"variants of bench/fidelity_variants.yaml (default: the seed's plain CycleGAN "
                        f"and the trainer's default, {DEFAULT_VARIANT}): {', '.join(sorted(VARIANTS))}")
    parser.add_argument("--uncertainty", choices=MODES, default="tta")
    parser.add_argument("--tta", action="store_true", help="score the mean of 10 flipped and shifted copies (train.evaluate --tta)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic subjects and, by default, of training")
    parser.add_argument("--train-seed", type=int, help="seed of the training runs (default: --seed); another seed of a variant "
                        "gets its own run folder, NAME-SIZE-STEPS-seedN, on the same data")
    parser.add_argument("--ensemble", type=int, default=1, help="train each variant with N training seeds (--train-seed "
                        "and the next N-1) and score their ensemble: the mean of their translations, and with the tta map "
                        "the spread of every member's copies (train.evaluate with N checkpoints)")
    parser.add_argument("--snapshots", type=int, default=1, help="keep N checkpoints spread over the second half of "
                        "each run, where the learning rate decays (the members of --uncertainty ensemble; the last one is "
                        "scored); N > 1 gets its own run folder, NAME-SIZE-STEPS-snapN")
    parser.add_argument("--train-subjects", type=int, default=0, help="train on N of the training subjects (train/main.py "
                        "--train_subjects), scored on the same val+test; its own run folder, NAME-SIZE-STEPS-Nsubjects")
    args = parser.parse_args()
    if not 1 <= args.snapshots <= args.steps // 2:
        parser.error(f"--snapshots must be between 1 and half of --steps ({args.steps // 2}), got {args.snapshots}")
    if args.ensemble < 1:
        parser.error(f"--ensemble must be at least 1, got {args.ensemble}")
    out = args.out.resolve()
    env = {**os.environ, "WANDB_MODE": "offline"}
    timings = {}

    if args.anatomy == "template":
        template, shards = out / "template", out / f"shards-template-{args.size}"
        if not template.exists():
            write_template_slices(template, args.seed)
        if not (shards / "manifest.json").exists():
            timings["pack_s"] = run("-m", "shards", "pack", "--t1", template / "t1", "--t2", template / "t2", "--out", shards,
                                    "--size", args.size, "--holdout", template / "holdout.txt", "--split", "1,0,0")
    else:
        ixi, shards = out / "ixi", out / f"shards-{args.size}"
        if not (ixi / "holdout.txt").exists():
            timings["synth_s"] = run("-m", "shards", "synth", "--out", ixi, "--subjects", args.subjects, "--seed", args.seed,
                                     "--downsample", 256 // args.size, "--lesions", "--holdout-anatomy")
        if not (shards / "manifest.json").exists():
            timings["pack_s"] = run("-m", "shards", "pack", "--t1", ixi / "IXI-T1.tar", "--t2", ixi / "IXI-T2.tar", "--out", shards,
                                    "--size", args.size, "--lesions", ixi / "IXI-lesions.tar", "--holdout", ixi / "holdout.txt",
                                    "--split", args.split)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    seeds = range(train_seed, train_seed + args.ensemble)

    results = {}
    paths, samples = scored_samples(shards)
    slices = noise_slices(samples)
    for name in args.variants:
        checkpoints = []
        for seed in seeds:
            run_dir = out / "runs" / run_name(args, name, seed)
            if rundir.read_summary(run_dir) is None:
                timings[f"train_{run_dir.name}_s"] = run(
                    "train/main.py", "--data", shards, "--out", run_dir, "--size", args.size, "--ngf", args.ngf, "--ndf", args.ngf,
                    "--batch_size", args.batch_size, "--max_steps", args.steps, "--steps_per_epoch", max(args.steps // 4, 1),
                    # at every validation (keeping the newest 2 and the best), or spread snapshots over the second half
                    "--checkpoint_every", args.steps // (2 * args.snapshots) if args.snapshots > 1 else max(args.steps // 4, 1),
                    "--checkpoints_total_limit", max(args.snapshots, 2), "--num_workers", 1, "--report_to", "none",
                    "--seed", seed, "--train_subjects", args.train_subjects, "--resume", "auto", *SEED, *flags(VARIANTS[name]), env=env)
            checkpoints.append(max((run_dir / "checkpoints").glob("step-*")))  # the step budget's last checkpoint, not val-selected
        report_dir = out / "reports" / (f"{run_name(args, name, train_seed)}{f'-ensemble{args.ensemble}' * (args.ensemble > 1)}"
                                        f"-{args.uncertainty}{'-tta-mean' * args.tta}")
        scored = {name: (checkpoints, report_dir)}
        best_step = rundir.read_summary(run_dir).get("best_checkpoint_step")
        best = run_dir / "checkpoints" / f"step-{best_step:07d}" if best_step is not None else None
        if args.ensemble == 1 and best and best.is_dir() and best != checkpoints[0]:  # what validation would have picked
            scored[f"{name}, best val checkpoint (step {best_step})"] = ([best], report_dir.with_name(f"{report_dir.name}-best"))
        for row, (members, folder) in scored.items():
            timings[f"evaluate_{folder.name}_s"] = run("-m", "train.evaluate", "--checkpoint", *members, "--data", shards / "test",
                                                       shards / "val", "--out", folder, "--overwrite", "--uncertainty", args.uncertainty,
                                                       *["--tta"] * args.tta, "--report_to", "none", stdout=subprocess.DEVNULL)
            results[row] = {**json.loads((folder / "report.json").read_text()), "noise_transfer": noise_transfers(members, slices, args.tta)}
    results["lookup table (reference)"] = lookup_reference(paths, samples)

    data = ("the MNI152 template's slices (93 train, 20 scored)" if args.anatomy == "template" else
            f"{args.subjects} synthetic subjects")
    lines = [f"{data} at {args.size}², {f'training on {args.train_subjects} of them, ' * (args.train_subjects > 0)}"
             f"{args.steps} steps of batch {args.batch_size}, ngf/ndf {args.ngf}, "
             f"training seed{f's {seeds[0]} to {seeds[-1]}, scored as one ensemble' if args.ensemble > 1 else f' {train_seed}'}; "
             f"evaluated on val+test (held-out subjects only); hallucination map: {args.uncertainty}"
             f"{'; translations: the mean of 10 flipped and shifted copies (--tta)' * args.tta}. "
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}.", "",
             "| variant | direction | masked SSIM | masked PSNR | texture | brightness vs truth ± over slices "
             "| input noise passed / returned | AUROC | lesions visible | lesion contrast ratio | lesion MAE | lesions flagged by the map |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, report in results.items():
        for direction in ("t1_to_t2", "t2_to_t1"):
            s = report["directions"][direction]["summary"]
            auroc = report["uncertainty"]["directions"][direction]["auroc"] if "uncertainty" in report else None
            lesion = report["lesions"].get(direction)
            noise = report.get("noise_transfer", {}).get(direction)
            noise_cell = f"{noise['passed']:.2f} / {noise['returned']:.2f}" if noise else "-"
            flagged = f"{100 * lesion['flagged_fraction']:.0f}%" if lesion and "flagged_fraction" in lesion else "-"
            lesion_cells = (f"{100 * lesion['visible_fraction']:.0f}% of {lesion['lesions']} | {lesion['contrast_ratio']:.2f} | "
                            f"{lesion['mae_lesion']:.3f} | {flagged}") if lesion else "- | - | - | -"
            lines.append(f"| {name} | {direction.replace('_', ' ')} | {s['ssim_masked']['mean']:.3f} | {s['psnr_masked']['mean']:.2f} | "
                         f"{s['texture']['mean']:.2f} | {brightness_cell(s['brightness'])} | {noise_cell} | "
                         f"{'-' if auroc is None else f'{auroc:.3f}'} | {lesion_cells} |")
    table = "\n".join(lines)
    print(table)
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "timings": timings,
                                                  "reports": results}, indent=2))


if __name__ == "__main__":
    main()
