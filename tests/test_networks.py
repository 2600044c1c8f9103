"""The generators' shape contract: --unet_depth bounds what each output pixel sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train.networks import build_generator


def seen_rows(net: nn.Module, size: int) -> tuple[int, int]:
    """First and last input row whose value reaches the centre output pixel through the convolutions (instance
    norm, which shares statistics over the whole slice, is taken out)."""
    for module in net.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.InstanceNorm2d):
                setattr(module, name, nn.Identity())
    image = torch.randn(1, 1, size, size, requires_grad=True)
    net(image)[0, 0, size // 2, size // 2].backward()
    rows = image.grad[0, 0].abs().sum(1).nonzero().flatten()
    return rows.min().item(), rows.max().item()


@pytest.mark.parametrize("depth, window", [(3, 30), (4, 62)])
def test_a_shallow_unet_sees_a_window_and_the_default_sees_the_slice(depth, window):
    torch.manual_seed(0)
    first, last = seen_rows(build_generator("unet", 128, 4, unet_depth=depth), 128)
    assert last - first + 1 == window
    assert seen_rows(build_generator("unet", 128, 4), 128) == (0, 127)
    out = build_generator("unet", 128, 4, unet_depth=depth)(torch.zeros(2, 1, 128, 128))
    assert out.shape == (2, 1, 128, 128)


@pytest.mark.parametrize("depth", [1, 8])
def test_a_unet_depth_outside_the_image_is_refused(depth):
    with pytest.raises(ValueError, match=f"U-Net depth must be 2..7 for size 128 \\(0 = 7\\), got {depth}"):
        build_generator("unet", 128, 4, unet_depth=depth)
