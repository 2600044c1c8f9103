"""Training-step throughput, achieved FLOP/s and peak memory of the trainer's own step on this machine.

    python bench/train_bench.py [--sizes 256 128] [--batch 1] [--steps 5] [trainer options ...]
    python bench/train_bench.py --sizes 256 --config train/recipes/seed.yaml    # the seed's (and reference's) network
    OMP_NUM_THREADS=1 python bench/train_bench.py --sizes 64 --batch 8 --config train/recipes/demo.yaml
    python bench/train_bench.py --reference ~/src/pytorch-CycleGAN-and-pix2pix --sizes 256 --batch 1 \
        --config train/recipes/seed.yaml --rounds 2          # the reference itself, alternating with ours
    python bench/train_bench.py --reference ... --also mixed_precision=bf16,channels_last=true   # a second set of ours

Runs train.step.train_step, the step train/main.py runs (both generators against frozen discriminators, then
both discriminators on image-pool fakes, the NaN guard, the moving average and the LR schedules, under
Accelerate's autocast), on random inputs, each size in a fresh process so peak RSS is per size. Every other
option is the trainer's own, with its defaults (docs/training.md): `--config`, `--ngf`, `--mixed_precision`, ...
FLOPs are counted with torch.utils.flop_counter over one full step (forward and backward). The machine's fp32
matmul FLOP/s is measured too, as the ceiling to compare against. Times are medians over the timed steps.

With --reference PATH, a local checkout of junyanz/pytorch-CycleGAN-and-pix2pix runs its own train.py at the
same network, loss and batch (bench/reference_cyclegan.py), alternating with this project's step, reference
first, for --rounds rounds (each round times every size), and the bench prints the ratio of images/s per size.
Each --also adds a configuration of ours (trainer options as key=value pairs), timed in the same rounds after
the first, so that the reference, this project as configured and, say, this project in bf16 share one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

import reference_cyclegan
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


def network(config: Config) -> str:
    depth = f" depth {config.unet_depth}" if config.generator == "unet" else ""
    return f"{config.generator}{depth} ngf {config.ngf} ndf {config.ndf}"


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
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    results.put({"size": size, "batch": batch, "step_s": seconds, "images_per_s": 2 * batch / seconds, "flops_per_step": flops,
                 "flop_per_s": flops / seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def run_ours(size: int, steps: int, config: Config) -> dict:
    """One size in a fresh process, so that peak RSS belongs to that size alone."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=one_size, args=(size, steps, config, results))
    proc.start()
    result = results.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--batch", type=int, help="images per step and contrast (default: the trainer's --batch_size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reference", type=Path, metavar="PATH", help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix to time beside ours")
    parser.add_argument("--reference-env", type=Path, default=Path("bench-out/reference-env"),
                        help="where the reference's own environment is made on first use")
    parser.add_argument("--rounds", type=int, default=2, help="with --reference: reference-then-ours rounds")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=VALUE,...",
                        help="another configuration of ours, timed in the same rounds: trainer options changed from the "
                             "rest of the command line, e.g. mixed_precision=bf16,channels_last=true")
    args, trainer_options = parser.parse_known_args()
    base = ["--data", "-", "--out", "-", *trainer_options, *(["--batch_size", str(args.batch)] if args.batch else [])]
    configs = {"": load_config(base)}
    for also in args.also:
        pairs = [pair.partition("=") for pair in also.split(",")]
        if not all(key and eq and value for key, eq, value in pairs):
            parser.error(f"--also {also}: expected trainer options as key=value pairs separated by commas")
        configs[also] = load_config([*base, *(arg for key, _, value in pairs for arg in (f"--{key}", value))])
    config = configs[""]
    if args.reference:
        reference_cyclegan.check_checkout(args.reference)
        for size in args.sizes:
            reference_cyclegan.options(config, size, 1)  # refuse a network the reference has not, before any setup
        reference_python = reference_cyclegan.prepare_env(args.reference_env)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    peak = matmul_flops()
    print(f"fp32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    ratios = {(also, size): [] for also in configs for size in args.sizes}
    for round_ in range(1, args.rounds + 1 if args.reference else 2):  # rounds outermost: a drift in speed reaches every size alike
        label = f"round {round_}: " if args.reference else ""
        for size in args.sizes:
            if args.reference:
                ref = reference_cyclegan.run(reference_python, args.reference, config, size, args.steps)
                print(f"{label}reference unet_{size} ngf {config.ngf} ndf {config.ndf} {size}^2 batch {config.batch_size}: "
                      f"{ref['step_s']:.3g} s/step, {2 * config.batch_size / ref['step_s']:.2f} images/s, "
                      f"peak RSS {ref['peak_rss_gib']:.2f} GiB", flush=True)
            for also, also_config in configs.items():
                r = run_ours(size, args.steps, also_config)
                print(f"{label}{network(also_config)}{f' with {also}' * bool(also)} {size}^2 batch {r['batch']}: {r['step_s']:.3g} s/step, "
                      f"{r['images_per_s']:.2f} images/s, {r['flops_per_step'] / 1e9:.0f} GFLOP/step, "
                      f"{r['flop_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['flop_per_s'] / peak:.0f}% of matmul, "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
                if args.reference:
                    ratios[also, size].append(ref["step_s"] / r["step_s"])
    for (also, size), size_ratios in ratios.items():
        if size_ratios:
            print(f"{size}^2{f' with {also}' * bool(also)}: this project's images/s over the reference's: "
                  f"{statistics.median(size_ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in size_ratios)})")


if __name__ == "__main__":
    main()
