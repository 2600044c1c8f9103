"""What masked SSIM can the demo's data and budget show? Two reference points for `make demo`'s result.

    python bench/demo_bounds.py [--ixi data/demo/ixi] [--steps N] [--size S] [--ngf N] [--batch-size B]
                                [--unet-depth D] [--upsample transpose|subpixel|resize] [--full-res C] [--lr LR]
                                [--lr-decay-start F]

--steps, --ngf and --batch-size default to train/recipes/demo.yaml's; --size to 64; the network to the seed's
full-depth U-Net with transposed convolutions, Adam 2e-4, no decay. docs/fidelity.md runs it on the fidelity set
at 128² with the fidelity bench's budget, and with the trainer's default generator and schedule for the paired
ceiling of that network.

The demo's synthetic IXI (run `make demo` first) is packed again with every subject paired
(--split 0,0.8,0.2): the 0.8 part trains the references, the 0.2 part scores them, with train/metrics.py.
- lookup table: per source-intensity bin (64 bins), the mean target intensity over the training pairs. The
  best any pixel-wise intensity mapping can do; a CycleGAN below it has not learned the contrast.
- supervised U-Net: the demo's generator (a U-Net of --ngf, Adam 2e-4) trained with L1 on the *paired*
  slices for --steps batches of --batch-size. Paired supervision is information CycleGAN does not
  get, so this is a generous upper reference for the unpaired model at the same size and budget.
Each is also scored by the slice's head area (bench/ssim_loss.py's groups, pooled over head pixels), to set
beside a CycleGAN's split from that tool.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ssim_loss import SLICE_AREAS, head_area_share  # bench/, the script's own folder
from train.data import val_samples
from train.metrics import slice_metrics
from train.networks import UPSAMPLE, build_generator
from train.step import linear_decay

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "train" / "recipes" / "demo.yaml").read_text())
BINS = 64


def arrays(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples]))[:, None] for k in ("t1", "t2", "mask")}


class LookupTable(nn.Module):
    """Per source-intensity bin, the mean target intensity of the fitting pixels; a 'generator' in the
    networks' [-1,1] convention, so the project's scoring (train.evaluate) can run it like a checkpoint's."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor, fit: torch.Tensor):
        """source, target: [0,1] images; fit: bool mask of the pixels to fit on."""
        super().__init__()
        bins = (source[fit] * BINS).long().clamp(0, BINS - 1)
        sums = torch.zeros(BINS).index_add_(0, bins, target[fit].float())
        counts = torch.zeros(BINS).index_add_(0, bins, torch.ones_like(target[fit], dtype=torch.float32))
        self.register_buffer("table", sums / counts.clamp(min=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[((x + 1) / 2 * BINS).long().clamp(0, BINS - 1)] * 2 - 1


def by_head_area(metrics: dict, share: np.ndarray) -> str:
    """Masked SSIM pooled over head pixels (bench/ssim_loss.py's figure) in each of SLICE_AREAS' groups of slices."""
    parts = []
    for low, high, name in SLICE_AREAS:
        part = torch.from_numpy((share > low) & (share <= high))
        area = metrics["mask_area"][part]
        score = f" {float((metrics['ssim_masked'][part] * area).sum() / area.sum()):.3f}" if part.any() else ""
        parts.append(f"{name} ({int(part.sum())} slices){score}")
    return ", ".join(parts)


def lookup_table(train: dict, test: dict, source: str, target: str) -> torch.Tensor:
    table = LookupTable(train[source], train[target], train["mask"])
    return (table(test[source] * 2 - 1) + 1) / 2 * test["mask"]


def supervised(train: dict, test: dict, source: str, target: str, args: argparse.Namespace) -> torch.Tensor:
    torch.manual_seed(args.seed)
    net = build_generator("unet", train[source].shape[-1], args.ngf, unet_depth=args.unet_depth, upsample=args.upsample,
                          full_res=args.full_res)
    optimizer = torch.optim.Adam(net.parameters(), args.lr, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(args.steps, args.lr_decay_start))
    for _ in range(args.steps):
        i = torch.randint(0, len(train[source]), (args.batch_size,))
        loss = F.l1_loss(net(train[source][i] * 2 - 1), train[target][i] * 2 - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        return torch.cat([(net(x * 2 - 1) + 1) / 2 for x in test[source].split(32)]).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ixi", type=Path, default=ROOT / "data" / "demo" / "ixi")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=DEMO["max_steps"])
    parser.add_argument("--ngf", type=int, default=DEMO["ngf"])
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    parser.add_argument("--unet-depth", type=int, default=0, help="stride-2 levels; 0 = down to 1x1 (the seed's)")
    parser.add_argument("--upsample", choices=UPSAMPLE, default="transpose")
    parser.add_argument("--full-res", type=int, default=0, help="channels of a full-resolution output stage (--unet_full_res); 0 = none")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lr-decay-start", type=float, default=1.0,
                        help="fraction of the steps after which the rate decays linearly to 0; 1 = no decay")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.ixi / "IXI-T1.tar").is_file():
        raise SystemExit(f"error: --ixi {args.ixi}: no IXI-T1.tar; run `make demo` first or pass the folder")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "shards", "pack", "--t1", args.ixi / "IXI-T1.tar", "--t2", args.ixi / "IXI-T2.tar",
                        "--out", Path(tmp) / "paired", "--size", str(args.size), "--split", "0,0.8,0.2"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        splits = {split: val_samples(str(Path(tmp) / "paired"), split) for split in ("val", "test")}
        if not all(splits.values()):
            raise SystemExit(f"error: --ixi {args.ixi}: too few subjects with both T1 and T2 to fit on 80% and score on "
                             f"20% ({', '.join(f'{len(v)} {k} slices' for k, v in splits.items())})")
        train, test = (arrays(samples) for samples in splits.values())
        share = head_area_share(splits["test"])
    print(f"{len(train['t1'])} training pairs, {len(test['t1'])} test slices; masked SSIM (mean over test slices), then "
          f"pooled over head pixels by the slice's head area as a share of its subject's largest")
    for source, target in (("t1", "t2"), ("t2", "t1")):
        metrics = {name: slice_metrics(pred, test[target], test["mask"])
                   for name, pred in (("lookup table", lookup_table(train, test, source, target)),
                                      (f"supervised U-Net, {args.steps} steps of {args.batch_size}",
                                       supervised(train, test, source, target, args)))}
        print(f"{source.upper()} -> {target.upper()}: " + ", ".join(f"{k} {v['ssim_masked'].mean().item():.3f}" for k, v in metrics.items()))
        for name, values in metrics.items():
            print(f"  {name}, by head area: {by_head_area(values, share)}", flush=True)


if __name__ == "__main__":
    main()
