"""Does lower-precision optimizer state pay on this machine? The generators' Adam step and the memory of its
state, for the trainer's fused fp32 Adam and for bitsandbytes' blockwise 8-bit Adam (Dettmers et al. 2022; the
`--use_8bit_adam` of the diffusers training examples), on both generators of a trainer configuration.

    python bench/optimizer_bench.py [--config train/recipes/seed.yaml] [--size 256] [--rounds 3] [trainer options ...]

The default is the reference's network (unet_256, ngf 64: 2 x 54.4 M parameters), where the Adam moments are
0.81 GiB of the 2.5 GiB peak RSS of a step (docs/benchmarks.md). bitsandbytes is not a dependency of this
project: `pip install bitsandbytes` to time it; without it only fused Adam is timed. Gradients are random, the
optimizers alternate within each round, and the figure is the median step time over the rounds after the
first (the first allocates the state).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from train.config import load_config
from train.networks import GeneratorSpec


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args, trainer_options = parser.parse_known_args()
    if "--config" not in trainer_options:
        trainer_options = ["--config", "train/recipes/seed.yaml", *trainer_options]
    config = dataclasses.replace(load_config(["--data", "-", "--out", "-", *trainer_options]), size=args.size)
    torch.manual_seed(0)
    params = [p for _ in range(2) for p in GeneratorSpec.from_config(config).build().parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adam = {"lr": config.lr, "betas": (config.beta1, config.beta2)}
    optimizers = {"fused Adam, fp32 state (the trainer's)": torch.optim.Adam(params, fused=True, **adam)}
    try:
        import bitsandbytes
        optimizers[f"bitsandbytes {bitsandbytes.__version__} Adam8bit"] = bitsandbytes.optim.Adam8bit(params, **adam)
    except ImportError:
        print("bitsandbytes is not installed: timing fused Adam alone (pip install bitsandbytes to compare)")
    print(f"two generators at {args.size}^2, ngf {config.ngf}: {sum(p.numel() for p in params) / 1e6:.1f} M parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = {name: [] for name in optimizers}
    for _ in range(args.rounds + 1):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    for name, optimizer in optimizers.items():
        print(f"{name}: {statistics.median(times[name][1:]):.3g} s/step, state {state_bytes(optimizer) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
