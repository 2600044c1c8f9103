"""Tissue contrast after a short run, over training seeds: for how many seeds does a recipe keep, flatten or
invert it? One seed is a draw (docs/fidelity.md, "The short-run contrast guard").

    python bench/contrast_seeds.py [--steps 40] [--seeds 0 1 2 3 4 5 6 7] [--out bench-out/contrast]
        [--recipe NAME=TRAINER_FLAGS ...]
    python bench/contrast_seeds.py --steps 1000 --seeds 0 1 2 --recipe default= --recipe "resize=--upsample resize"

The tests' phantom and network: 10 synthetic subjects packed at 64² (`shards synth --seed 1 --downsample 4`),
ngf/ndf 16, batch 2. Each recipe (trainer flags on top of the defaults; the default recipes are the trainer's
defaults and `--config train/recipes/seed.yaml`) is trained for --steps steps with each seed, in a fresh
process; train.fidelity.tissue_contrast scores its last checkpoint on val+test (1 keeps the contrast, 0
flattens it, below 0 inverts it). Runs already in --out are reused. Prints, per recipe and seed, T1->T2 /
T2->T1 and the discriminators' losses at step 50 or the last (near 0: they have won, and the generators learn from the
cycle and structure terms alone), then the median over the seeds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from train import rundir
from train.fidelity import tissue_contrast

ROOT = Path(__file__).resolve().parents[1]
NETWORK = ["--ngf", "16", "--ndf", "16", "--batch_size", "2", "--num_workers", "1", "--report_to", "none", "--log_every", "5"]
RECIPES = ["default=", "seed=--config train/recipes/seed.yaml"]


def shards(out: Path) -> Path:
    packed = out / "shards-64"
    if not (packed / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "synth", "--out", out / "ixi", "--subjects", "10", "--seed", "1",
                        "--downsample", "4"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "shards", "pack", "--t1", out / "ixi" / "IXI-T1.tar", "--t2", out / "ixi" / "IXI-T2.tar",
                        "--out", packed, "--size", "64", "--shard-size", "100"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return packed


def discriminator_losses(run: Path, step: int) -> str:
    for row in rundir.read_metrics(run):
        if row.get("step") == step and "loss/D_t1" in row:
            return f"{row['loss/D_t1']:.3f} / {row['loss/D_t2']:.3f}"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "contrast")
    parser.add_argument("--recipe", action="append", help="NAME=TRAINER_FLAGS (repeatable; default: the trainer's defaults "
                        "and the seed's recipe)")
    args = parser.parse_args()
    data = shards(args.out)
    print(f"tissue contrast kept after {args.steps} steps (T1->T2 / T2->T1; 1 keeps, 0 flattens, < 0 inverts), "
          f"64² phantom, ngf/ndf 16, batch 2")
    print(f"| recipe | seed | contrast kept | discriminator losses at step {min(args.steps, 50)} |\n|---|---|---|---|")
    medians = {}
    for recipe in args.recipe or RECIPES:
        name, _, flags = recipe.partition("=")
        kept = []
        for seed in args.seeds:
            run = args.out / "runs" / f"{name}-{args.steps}-seed{seed}"
            last = rundir.checkpoint_dir(run, args.steps)
            if not last.exists():
                subprocess.run([sys.executable, "train/main.py", *shlex.split(flags), "--data", data, "--out", run, *NETWORK,
                                "--seed", str(seed), "--max_steps", str(args.steps), "--steps_per_epoch", "20",
                                "--checkpoint_every", str(args.steps)], cwd=ROOT, check=True, capture_output=True,
                               env={**os.environ, "WANDB_MODE": "offline"})
            kept.append(tissue_contrast(last, data))
            print(f"| {name} | {seed} | {kept[-1]['t1_to_t2']:.3f} / {kept[-1]['t2_to_t1']:.3f} | {discriminator_losses(run, min(args.steps, 50))} |",
                  flush=True)
        medians[name] = {d: statistics.median(k[d] for k in kept) for d in rundir.DIRECTIONS}
    for name, median in medians.items():
        print(f"median over seeds, {name}: {median['t1_to_t2']:.3f} / {median['t2_to_t1']:.3f}")


if __name__ == "__main__":
    main()
