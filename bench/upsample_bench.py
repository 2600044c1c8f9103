"""Is there a faster way to compute the reference U-Net's decoder? Forward + backward time of each of unet_256's
4x4 stride-2 transposed convolutions (batch 1), three ways that compute the same function:

- as nn.ConvTranspose2d does it;
- as a sub-pixel convolution: one 2x2 convolution with 4x the output channels over the input padded by one,
  each output phase cropped from it and interleaved (same parameters, rearranged; same multiply-adds);
- as nn.ConvTranspose2d in channels_last memory layout.

    python bench/upsample_bench.py [--repeats 4]

On a GPU when there is one. Prints per layer the three times in ms and the largest difference of the sub-pixel output from the transposed
one, so a layout or reformulation that pays on some machine shows there before it goes into train/networks.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# (in channels, out channels, input side) of unet_256's decoder at ngf 64, innermost first
LAYERS = [(512, 512, 1), (1024, 512, 2), (1024, 512, 4), (1024, 512, 8), (1024, 256, 16), (512, 128, 32), (256, 64, 64), (128, 1, 128)]


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d(k=4, s=2, p=1) weights (Cin, Cout, 4, 4) -> Conv2d weights (Cout*4, Cin, 2, 2) in
    (out channel, row phase, column phase) order: output pixel (2i+a, 2j+b) sums input rows i-1+a..i+a and
    columns j-1+b..j+b against the kernel taps 3-a-2t, flipped, which is every other tap from a."""
    flipped = weight.flip(2, 3).transpose(0, 1)  # (Cout, Cin, 4, 4)
    phases = torch.stack([torch.stack([flipped[:, :, a::2, b::2] for b in (0, 1)], 1) for a in (0, 1)], 1)
    return phases.reshape(-1, weight.shape[0], 2, 2)


def subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    out = F.conv2d(F.pad(x, (1, 1, 1, 1)), phase_weights(weight)).view(n, weight.shape[1], 2, 2, h + 1, w + 1)
    rows = [torch.stack([out[:, :, a, b, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)]  # (n, Cout, h, w, 2)
    return torch.stack(rows, 3).reshape(n, -1, 2 * h, 2 * w) + bias.view(1, -1, 1, 1)


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):
        fn(x).square().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).square().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    totals = [0.0, 0.0, 0.0]
    for cin, cout, side in LAYERS:
        layer = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, device=device)
        x = torch.randn(1, cin, side, side, device=device, requires_grad=True)
        error = (layer(x) - subpixel(x, layer.weight, layer.bias)).abs().max().item()
        last = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, device=device).to(memory_format=torch.channels_last)
        x_last = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        times = [timed(layer, x, args.repeats), timed(lambda x, layer=layer: subpixel(x, layer.weight, layer.bias), x, args.repeats),
                 timed(last, x_last, args.repeats)]
        totals = [t + s for t, s in zip(totals, times)]
        print(f"{cin:4d}->{cout:3d} at {side:3d}^2: transposed {1e3 * times[0]:6.1f} ms, sub-pixel {1e3 * times[1]:6.1f} ms, "
              f"channels_last {1e3 * times[2]:6.1f} ms; sub-pixel differs by {error:.1e}")
    print(f"decoder, one pass forward + backward: transposed {1e3 * totals[0]:.0f} ms, sub-pixel {1e3 * totals[1]:.0f} ms, "
          f"channels_last {1e3 * totals[2]:.0f} ms")


if __name__ == "__main__":
    main()
