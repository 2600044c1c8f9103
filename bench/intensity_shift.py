"""Does a model still translate when its input's contrast is not the training set's? Another scanner or site
leaves a slice with another gamma and gain after the shards' percentile normalization. This scores checkpoints
on paired shards with every input shifted by x -> clip(gain * x**gamma, 0, 1), by train.evaluate's own scoring
(masked SSIM pooled per subject, mean over subjects; the unshifted column is train.evaluate's figure).

    python bench/intensity_shift.py --checkpoint RUN [RUN ...] --data SHARDS/test [SHARDS/val]
                                    [--shifts 1,1 0.8,1 1.25,1 1,0.9 1,1.1]

A run folder stands for its best checkpoint, as in train.evaluate. Prints one row per checkpoint and direction,
with the largest fall from the unshifted score where the shifts include 1,1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from train import rundir
from train.inference import CheckpointError, device_for_inference, load_translator
from train.networks import from_model_range, to_model_range
from train.scoring import ScoringError, score, split_shards, summarize


class ShiftedInput(nn.Module):
    """A translator whose [-1,1] input is first shifted in [0,1] intensities: x -> clip(gain * x**gamma, 0, 1)."""

    def __init__(self, translator: nn.Module, gamma: float, gain: float):
        super().__init__()
        self.translator, self.gamma, self.gain = translator, gamma, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.translator(to_model_range((from_model_range(x) ** self.gamma * self.gain).clamp(0, 1)))


def shift(text: str) -> tuple[float, float]:
    try:
        gamma, gain = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a shift is GAMMA,GAIN, e.g. 0.8,1") from None
    if gamma <= 0 or gain <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: gamma and gain must be positive")
    return gamma, gain


def shifted_scores(checkpoint: Path, paths: list[str], shifts: list[tuple[float, float]], device: torch.device) -> dict:
    """{direction: [masked SSIM at each shift]} for one checkpoint (or run folder)."""
    translators = {name: load_translator([checkpoint], name, device)[0] for name in rundir.DIRECTIONS}
    scores = {name: [] for name in rundir.DIRECTIONS}
    for gamma, gain in shifts:
        rows, _ = score({name: ShiftedInput(t, gamma, gain) for name, t in translators.items()}, paths, 16, device)
        for name in rundir.DIRECTIONS:
            scores[name].append(summarize(rows[name])["summary"]["ssim_masked"]["mean"])
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="checkpoints or run folders, each scored on its own")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="split folders of paired shards, e.g. SHARDS/test")
    parser.add_argument("--shifts", type=shift, nargs="+", default=[(1.0, 1.0), (0.8, 1.0), (1.25, 1.0), (1.0, 0.9), (1.0, 1.1)],
                        help="GAMMA,GAIN pairs applied to every input (default: none, gamma 0.8 and 1.25, gain 0.9 and 1.1)")
    args = parser.parse_args(argv)
    try:
        paths = [path for folder in args.data for path in split_shards(folder)]
    except ScoringError as err:
        raise SystemExit(f"error: --data {err}")
    device = device_for_inference()
    lines = ["| checkpoint | direction | " + " | ".join(f"γ {g:g}, gain {k:g}" for g, k in args.shifts) + " | largest drop |",
             "|---|---|" + "---|" * (len(args.shifts) + 1)]
    unshifted = args.shifts.index((1.0, 1.0)) if (1.0, 1.0) in args.shifts else None
    for checkpoint in args.checkpoint:
        try:
            scores = shifted_scores(checkpoint, paths, args.shifts, device)
        except CheckpointError as err:
            raise SystemExit(f"error: --checkpoint {err}")
        except ScoringError as err:
            raise SystemExit(f"error: {err}")
        for name, values in scores.items():
            drop = "-" if unshifted is None else f"{max(values[unshifted] - v for v in values):.3f}"
            lines.append(f"| {checkpoint} | {rundir.LABELS[name]} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {drop} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
