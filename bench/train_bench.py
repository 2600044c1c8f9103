"""Training-step throughput, achieved FLOP/s and peak memory of the trainer's own step on this machine.

    python bench/train_bench.py [--sizes 256 128] [--batch 1] [--steps 5] [trainer options ...]
    python bench/train_bench.py --sizes 256 --config train/recipes/seed.yaml    # the seed's (and reference's) network
    OMP_NUM_THREADS=1 python bench/train_bench.py --sizes 64 --batch 8 --config train/recipes/demo.yaml

Runs train.step.train_step, the step train/main.py runs (both generators against frozen discriminators, then
both discriminators on image-pool fakes, the NaN guard, the moving average and the LR schedules, under
Accelerate's autocast), on random inputs, each size in a fresh process so peak RSS is per size. Every other
option is the trainer's own, with its defaults (docs/training.md): `--config`, `--ngf`, `--mixed_precision`, ...
FLOPs are counted with torch.utils.flop_counter over one full step (forward and backward). The machine's fp32
matmul FLOP/s is measured too, as the ceiling to compare against.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import os
import platform
import resource
import time

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from train.config import Config, load_config
from train.step import build_cycle_gan, train_step


def matmul_flops(n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def one_size(size: int, steps: int, config: Config, results) -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision or "no")
    model = build_cycle_gan(accelerator, dataclasses.replace(config, size=size), total_steps=steps + 2)
    device, batch = accelerator.device, config.batch_size

    steps_taken = itertools.count()

    def step():
        real_a, real_b = (torch.rand(batch, 1, size, size, device=device) * 2 - 1 for _ in range(2))
        assert train_step(accelerator, model, real_a, real_b, next(steps_taken)) is not None, "a NaN loss on random inputs"

    step()  # warm up (allocator, oneDNN primitives)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    results.put({"size": size, "batch": batch, "step_s": seconds, "images_per_s": 2 * batch / seconds, "flops_per_step": flops,
                 "flop_per_s": flops / seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--batch", type=int, help="images per step and contrast (default: the trainer's --batch_size)")
    parser.add_argument("--steps", type=int, default=5)
    args, trainer_options = parser.parse_known_args()
    config = load_config(["--data", "-", "--out", "-", *trainer_options, *(["--batch_size", str(args.batch)] if args.batch else [])])

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    peak = matmul_flops()
    print(f"fp32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    ctx = mp.get_context("spawn")  # a fresh process per size: peak RSS belongs to that size alone
    for size in args.sizes:
        results = ctx.Queue()
        proc = ctx.Process(target=one_size, args=(size, args.steps, config, results))
        proc.start()
        r = results.get()
        proc.join()
        depth = f" depth {config.unet_depth}" if config.generator == "unet" else ""
        network = f"{config.generator}{depth} ngf {config.ngf} ndf {config.ndf}"
        print(f"{network} {size}^2 batch {r['batch']}: {r['step_s']:.2f} s/step, {r['images_per_s']:.2f} images/s, "
              f"{r['flops_per_step'] / 1e9:.0f} GFLOP/step, {r['flop_per_s'] / 1e9:.1f} GFLOP/s "
              f"= {100 * r['flop_per_s'] / peak:.0f}% of matmul, peak RSS {r['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
