"""What the structure loss charges a translation, with and without MIND's noise floor (--mind_noise_floor),
measured on aligned T1/T2 pairs (docs/fidelity.md, "Where the last tenth of SSIM goes").

    python bench/mind_floor.py --data SHARDS/test [--checkpoint RUN] [--floors 0 3 10] [--extra-noise 0.01]

Per direction and floor, the structure loss's L1 between the MIND descriptors of the input and of a candidate
translation, over the head and over the truth's flat half (below the median of its smoothed gradient):
  truth             the true other contrast: what a perfect translation pays
  truth, noisier    the truth with Gaussian noise of --extra-noise (of the [0,1] range) added: its own noise
  input noisier     the truth, scored against an input with that noise added
  1 px off          the truth moved one pixel: what a small structural error costs
  translation       the checkpoint's single-pass translation (with --checkpoint)
A loss that describes anatomy charges the noisier rows about what it charges the truth, and the moved truth
clearly more; one that describes noise charges them more, and a translation that copies its input's noise
can pay less than the truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ssim_loss import edge_strength  # bench/, the script's own folder
from train import rundir
from train.inference import load_translator, translate_slices
from train.losses import mind
from train.networks import to_model_range
from train.scoring import read_samples, split_shards


def flat_half(truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    edge = edge_strength(truth)
    return mask & (edge < np.median(edge[mask]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="split folders of paired shards")
    parser.add_argument("--checkpoint", type=Path, help="a run folder (its best checkpoint) or a checkpoint folder")
    parser.add_argument("--floors", type=float, nargs="+", default=[0.0, 3.0, 10.0])
    parser.add_argument("--extra-noise", type=float, default=0.01)
    parser.add_argument("--every", type=int, default=3, help="score every Nth slice")
    args = parser.parse_args()

    samples = list(read_samples([path for folder in args.data for path in split_shards(folder)]))[::args.every]
    stack = {key: torch.from_numpy(np.stack([s[key] for s in samples]))[:, None] for key in ("t1", "t2", "mask")}
    mask = stack["mask"].numpy() > 0
    noise = torch.Generator().manual_seed(0)
    print(f"{len(samples)} slices of {', '.join(map(str, args.data))}; extra noise {args.extra_noise}")
    columns = ["truth (flat half)", "truth, noisier", "input noisier", "1 px off", *["translation"] * bool(args.checkpoint)]
    print("| direction | floor | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for direction, (source, target) in rundir.DIRECTIONS.items():
        inputs, truth = stack[source], stack[target]
        head, flat = torch.from_numpy(mask), torch.from_numpy(flat_half(truth.numpy(), mask))
        extra = args.extra_noise * torch.randn(truth.shape, generator=noise)
        candidates = {"truth": (inputs, truth), "truth, noisier": (inputs, truth + extra * head),
                      "input noisier": (inputs + extra * head, truth), "1 px off": (inputs, torch.roll(truth, 1, dims=-1))}
        if args.checkpoint:
            net = load_translator([args.checkpoint], direction)[0]
            candidates["translation"] = (inputs, torch.from_numpy(translate_slices(net, inputs[:, 0].numpy(), batch_size=32)).clamp(0, 1)[:, None])
        for floor in args.floors:
            cells = []
            for name, (given, candidate) in candidates.items():
                described = [mind(to_model_range(image), noise_floor=floor) for image in (candidate, given)]
                cost = (described[0] - described[1]).abs().mean(1, keepdim=True)
                cells.append(f"{cost[head].mean():.4f}" + (f" ({cost[flat].mean():.4f})" if name == "truth" else ""))
            print(f"| {direction} | {floor:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
