"""Training-step throughput, achieved FLOP/s and peak memory of the CycleGAN on this machine.

    python bench/train_bench.py [--sizes 256 128] [--batch 1] [--steps 5] [--generator unet] [--unet_depth 0]
                                [--ngf 64] [--gan_loss bce] [--lambda_identity 0.5] [--lambda_structure 0]
    OMP_NUM_THREADS=1 python bench/train_bench.py --sizes 64 --batch 8 --ngf 24 --gan_loss lsgan \
        --lambda_identity 0 --lambda_structure 5                  # the demo's step on one thread (ndf = ngf here)

Runs the trainer's own step (train.losses + Adam on both generators and both discriminators, image pool
included) on random inputs, each size in a fresh process so peak RSS is per size. FLOPs are counted with
torch.utils.flop_counter over one full step (forward and backward). The machine's fp32 matmul FLOP/s is
measured too, as the ceiling to compare against.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from train.losses import ImagePool, discriminator_losses, generator_losses
from train.networks import CycleGenerators, Discriminators, build_discriminator, build_generator


def matmul_flops(n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def one_size(size: int, batch: int, steps: int, generator: str, unet_depth: int, ngf: int, losses: dict, results) -> None:
    torch.manual_seed(0)
    gens = CycleGenerators(*(build_generator(generator, size, ngf, unet_depth) for _ in range(2)))
    discs = Discriminators(build_discriminator(ngf), build_discriminator(ngf))
    adam = {"lr": 2e-4, "betas": (0.5, 0.999), "fused": True}  # as the trainer on CPU
    opt_g, opt_d = torch.optim.Adam(gens.parameters(), **adam), torch.optim.Adam(discs.parameters(), **adam)
    pools = ImagePool(50, 0), ImagePool(50, 1)

    def step():
        real_a, real_b = torch.rand(batch, 1, size, size) * 2 - 1, torch.rand(batch, 1, size, size) * 2 - 1
        discs.requires_grad_(False)
        fakes, losses_g = generator_losses(gens, discs, real_a, real_b, losses["gan_loss"], 10.0, losses["lambda_identity"],
                                           losses["lambda_structure"])
        discs.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        losses_g["G"].backward()
        opt_g.step()
        fake_a, fake_b = pools[0].query(fakes["fake_a"].detach()), pools[1].query(fakes["fake_b"].detach())
        losses_d = discriminator_losses(discs, real_a, real_b, fake_a, fake_b, losses["gan_loss"])
        opt_d.zero_grad(set_to_none=True)
        losses_d["D"].backward()
        opt_d.step()

    step()  # warm up (allocator, oneDNN primitives)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    results.put({"size": size, "batch": batch, "step_s": seconds, "images_per_s": 2 * batch / seconds, "flops_per_step": flops,
                 "flop_per_s": flops / seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--generator", default="unet", choices=["unet", "resnet9"])
    parser.add_argument("--unet_depth", type=int, default=0, help="U-Net levels, as the trainer's option (0 = down to 1x1)")
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--gan_loss", default="bce", choices=["bce", "lsgan"])
    parser.add_argument("--lambda_identity", type=float, default=0.5, help="0 skips the identity passes, as the trainer does")
    parser.add_argument("--lambda_structure", type=float, default=0.0, help="MIND structure loss weight")
    args = parser.parse_args()

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    peak = matmul_flops()
    print(f"fp32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    losses = {k: getattr(args, k) for k in ("gan_loss", "lambda_identity", "lambda_structure")}
    ctx = mp.get_context("spawn")  # a fresh process per size: peak RSS belongs to that size alone
    for size in args.sizes:
        results = ctx.Queue()
        proc = ctx.Process(target=one_size, args=(size, args.batch, args.steps, args.generator, args.unet_depth, args.ngf, losses,
                                                         results))
        proc.start()
        r = results.get()
        proc.join()
        depth = f" depth {args.unet_depth}" if args.unet_depth else ""
        print(f"{args.generator}{depth} {size}^2 batch {r['batch']}: {r['step_s']:.2f} s/step, {r['images_per_s']:.2f} images/s, "
              f"{r['flops_per_step'] / 1e9:.0f} GFLOP/step, {r['flop_per_s'] / 1e9:.1f} GFLOP/s "
              f"= {100 * r['flop_per_s'] / peak:.0f}% of matmul, peak RSS {r['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
