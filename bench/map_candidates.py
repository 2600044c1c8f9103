"""Candidate hallucination maps against the project's tta map, on one checkpoint (docs/fidelity.md).

    python bench/map_candidates.py --checkpoint RUN/checkpoints/step-NNNNNNN --data SHARDS/test SHARDS/val
                                   [--error-threshold 0.1] [--batch-size 16]

Each candidate is the std of perturbed translations of each slice (10; 14 for rotate-zoom), scored as
train.evaluate scores a map: the AUROC for pixels whose |error| exceeds the threshold inside the head
(train.fidelity.ErrorDetection), both for the single-pass translation and for the mean of the 10 flipped and
shifted copies (--tta). Candidates:
  flip-shift    the `tta` map (train/inference.py Translator.averaged)
  rotate        rotations of 0, ±5 and ±10 degrees about the slice centre, with and without a left-right flip
  zoom          zooms of 0.9, 0.95, 1, 1.05 and 1.1, with and without a flip
  rotate-zoom   both (Wang et al. 2019 augment with flips, rotations and scalings), 14 copies
  dropout-P     dropout at rate P on the input of every transposed convolution, at test time only (dropout
                injection, Ledda et al. 2023: no retraining)
Each rotated or zoomed copy is resampled bilinearly and its translation moved back the same way.
A checkpoint trained with --lambda_aleatoric adds the maps of its scale head:
  aleatoric     the `aleatoric` map of a single pass
  aleatoric-tta its mean over the flip-shift copies (the `aleatoric` map with --tta)
  total         flip-shift and aleatoric-tta as one std, sqrt(spread^2 + 2 b^2) (a Laplace of scale b has
                variance 2 b^2): the copies' disagreement plus the error each copy expects (Kendall & Gal 2017)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train import rundir
from train.scoring import batched, read_samples, split_shards
from train.fidelity import ErrorDetection, HallucinationMap
from train.inference import Translator, load_generator, translate

# (degrees, zoom) per copy; each with and without a left-right flip
ROTATE = ((0, 1.0), (5, 1.0), (-5, 1.0), (10, 1.0), (-10, 1.0))
ZOOM = ((0, 1.0), (0, 0.9), (0, 0.95), (0, 1.05), (0, 1.1))
ROTATE_ZOOM = ((0, 1.0), (10, 1.0), (-10, 1.0), (0, 0.9), (0, 1.1), (5, 0.95), (-5, 1.05))
DROPOUT_RATES = (0.05, 0.1, 0.2)


def warp(images: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """[0,1] slices rotated by `degrees` and zoomed by `zoom` about their centre; outside stays background (0)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warped_copies(net: nn.Module, images: torch.Tensor, transforms) -> torch.Tensor:
    """(copies, N,1,H,W): the translations of each warped (and flipped) copy, moved back."""
    out = []
    for flip in (False, True):
        for degrees, zoom in transforms:
            copy = warp(images, degrees, zoom)
            translated = translate(net, copy.flip(-1) if flip else copy)
            out.append(warp(translated.flip(-1) if flip else translated, -degrees, 1 / zoom))
    return torch.stack(out)


def dropout_copies(net: nn.Module, images: torch.Tensor, rate: float, copies: int = 10) -> torch.Tensor:
    hooks = [m.register_forward_pre_hook(lambda _, inputs: (F.dropout(inputs[0], rate, training=True),))
             for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    try:
        return torch.stack([translate(net, images) for _ in range(copies)])
    finally:
        for hook in hooks:
            hook.remove()


def candidates(net: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    averaged = Translator([net]).averaged()
    return {"flip-shift": lambda x: translate(averaged.copies, x),
            "rotate": lambda x: warped_copies(net, x, ROTATE),
            "zoom": lambda x: warped_copies(net, x, ZOOM),
            "rotate-zoom": lambda x: warped_copies(net, x, ROTATE_ZOOM),
            **{f"dropout-{rate}": lambda x, rate=rate: dropout_copies(net, x, rate) for rate in DROPOUT_RATES}}


SCALE_MAPS = ("aleatoric", "aleatoric-tta", "total")


def scale_maps(heads: tuple[HallucinationMap, HallucinationMap], images: torch.Tensor, spread: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SCALE_MAPS of a generator with a scale head, as --uncertainty aleatoric computes them without and
    with --tta (`heads`); `spread`: the flip-shift map."""
    single, averaged = heads[0](images)[1], heads[1](images)[1]
    return {"aleatoric": single, "aleatoric-tta": averaged, "total": (spread**2 + 2 * averaged**2).sqrt()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="split folders of paired shards")
    parser.add_argument("--error-threshold", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    paths = [path for folder in args.data for path in split_shards(folder)]
    torch.manual_seed(0)  # the dropout masks
    aurocs, start = {}, time.time()
    for name, (source, target) in rundir.DIRECTIONS.items():
        net = load_generator(args.checkpoint, name)[0]
        perturbations = candidates(net)
        translator = Translator([net])
        heads = tuple(HallucinationMap("aleatoric", t, args.checkpoint, name) for t in (translator, translator.averaged())
                      ) if translator.scale_head else None
        names = [*perturbations, *(SCALE_MAPS if heads else ())]
        detectors = {(translation, candidate): ErrorDetection(args.error_threshold)
                     for translation in ("single pass", "--tta") for candidate in names}
        for chunk in batched(read_samples(paths), args.batch_size):
            x, truth, mask = (torch.from_numpy(np.stack([s[k] for s in chunk]))[:, None] for k in (source, target, "mask"))
            spreads = {candidate: copies(x) for candidate, copies in perturbations.items()}
            maps = {candidate: copies.std(0) for candidate, copies in spreads.items()}
            if heads:
                maps.update(scale_maps(heads, x, maps["flip-shift"]))
            preds = {"single pass": translate(net, x), "--tta": spreads["flip-shift"].mean(0)}
            for (translation, candidate), detector in detectors.items():
                detector.update(maps[candidate], preds[translation], truth, mask)
        aurocs[name] = {key: detector.result()["auroc"] for key, detector in detectors.items()}

    print(f"{args.checkpoint}; pixels with |error| > {args.error_threshold} inside the head; "
          f"{time.time() - start:.0f} s. Machine: {platform.machine()}, {os.cpu_count()} cores.\n")
    print("| translation | map | AUROC T1→T2 | AUROC T2→T1 |\n|---|---|---|---|")
    for key in aurocs["t1_to_t2"]:
        print(f"| {key[0]} | {key[1]} | {aurocs['t1_to_t2'][key]:.3f} | {aurocs['t2_to_t1'][key]:.3f} |")


if __name__ == "__main__":
    main()
