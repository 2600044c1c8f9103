"""The generators' shape contract: --unet_depth bounds what each output pixel sees; --lambda_aleatoric adds a scale head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.networks import (MIN_SCALE, BilinearUp2x, Blur, CycleGenerators, SubPixelUpsample, _downsample, _upsample, build_generator,
                            init_weights, reflect_pad)


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


def test_a_scale_head_adds_a_positive_scale_beside_the_same_translation():
    torch.manual_seed(0)
    net = build_generator("unet", 32, 4, scale_head=True)
    x = torch.randn(2, 1, 32, 32)
    out = net.with_scale(x)
    assert out.shape == (2, 2, 32, 32)
    assert torch.equal(out[:, :1], net(x)) and (out[:, 1:] >= MIN_SCALE).all()
    plain = build_generator("unet", 32, 4)
    # the head is a second output of the last layer: the parameter names stay, so checkpoints from before it load
    assert set(plain.state_dict()) == set(net.state_dict())
    assert [k for k, v in net.state_dict().items() if v.shape != plain.state_dict()[k].shape] == [
        "model.model.3.weight", "model.model.3.bias"]
    with pytest.raises(ValueError, match="no scale head"):
        plain.with_scale(x)
    with pytest.raises(ValueError, match="needs the unet generator"):
        build_generator("resnet9", 32, 4, scale_head=True)


def test_cycle_generators_return_the_reconstructions_scales_only_with_heads():
    real_a, real_b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    for heads in (True, False):
        gens = CycleGenerators(*(build_generator("unet", 32, 4, scale_head=heads) for _ in range(2)))
        for identity in (True, False):
            out = gens(real_a, real_b, identity=identity)
            assert ("rec_a_scale" in out and "rec_b_scale" in out) == heads
            if heads:
                assert out["rec_a_scale"].shape == real_a.shape
                assert torch.equal(out["rec_a"], gens.g_ba(out["fake_b"]))


def test_resize_upsampling_has_no_checkerboard_and_keeps_the_unet_contract():
    """On a constant input a 4x4 stride-2 transposed convolution gives odd and even pixels different values (the
    checkerboard); nearest resizing and a 3x3 convolution give one value everywhere inside the border."""
    torch.manual_seed(0)
    flat = torch.ones(1, 8, 8, 8)
    transposed = _upsample(8, 4, "transpose", bias=False)(flat)[0, :, 2:-2, 2:-2]
    assert (transposed[:, 0::2, 0::2] - transposed[:, 1::2, 1::2]).abs().max() > 1e-3
    resized = _upsample(8, 4, "resize", bias=False)(flat)[0, :, 1:-1, 1:-1]
    assert torch.allclose(resized, resized[:, :1, :1].expand_as(resized), atol=1e-6)
    net = build_generator("unet", 64, 8, unet_depth=3, upsample="resize")
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    resnet = build_generator("resnet9", 64, 8, upsample="resize")  # the U-Net decoder's option: the ResNet keeps its own
    assert any(isinstance(m, nn.ConvTranspose2d) for m in resnet.modules())


def test_subpixel_upsampling_starts_checkerboard_free_and_learns_a_kernel_per_phase():
    """ICNR: the four output phases start with one kernel, so every 2x2 block of the output is one value, on
    any input, and a constant input gives one value inside the border. One gradient step that rewards a
    checkerboard moves the phases apart: they are four kernels, not one tied kernel."""
    torch.manual_seed(0)
    layer = init_weights(_upsample(8, 4, "subpixel", bias=True))
    assert layer(torch.randn(1, 8, 8, 8)).shape == (1, 4, 16, 16)
    out = layer(torch.randn(2, 8, 8, 8))
    assert torch.equal(out[..., 0::2, 0::2], out[..., 1::2, 1::2]) and torch.equal(out[..., 0::2, 0::2], out[..., 0::2, 1::2])
    flat = layer(torch.ones(1, 8, 8, 8))[0, :, 2:-2, 2:-2]
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat), atol=1e-6)
    checkerboard = torch.ones(16, 16)
    checkerboard[0::2, 0::2] = checkerboard[1::2, 1::2] = -1
    (-(layer(torch.randn(2, 8, 8, 8)) * checkerboard).mean()).backward()
    with torch.no_grad():
        for p in layer.parameters():
            p -= p.grad
    out = layer(torch.randn(2, 8, 8, 8))
    assert (out[..., 0::2, 0::2] - out[..., 0::2, 1::2]).abs().max() > 1e-2
    net = build_generator("unet", 64, 8, unet_depth=3, upsample="subpixel")
    assert sum(isinstance(m, SubPixelUpsample) for m in net.modules()) == 3
    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.Upsample)) for m in net.modules())
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_blur_downsampling_removes_what_subsampling_would_alias_and_keeps_the_unet_contract():
    """The [1,2,1] low-pass keeps a constant (borders included) and zeroes the highest frequency, a one-pixel
    checkerboard, which a stride-2 convolution would fold onto a constant. After a LeakyReLU, as in the U-Net, a
    one-pixel shift of the input changes the blurred downsampling's features by less than half what it changes
    the strided one's. The slice's own level stays strided: only the levels below it are blurred."""
    flat = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(Blur()(flat), flat)
    checkerboard = torch.ones(1, 3, 8, 8)
    checkerboard[..., 0::2, 1::2] = checkerboard[..., 1::2, 0::2] = -1
    assert Blur()(checkerboard).abs().max() < 1e-6
    features = torch.nn.functional.leaky_relu(torch.randn(2, 8, 32, 32, generator=torch.Generator().manual_seed(0)), 0.2)
    change = {}
    for mode in ("strided", "blur"):
        torch.manual_seed(0)
        down = _downsample(8, 16, mode)
        with torch.no_grad():
            still, shifted = down(features)[..., 2:-2, 2:-2], down(features.roll(1, -1))[..., 2:-2, 2:-2]
        change[mode] = ((shifted - still).norm() / still.norm()).item()
    assert change["blur"] < change["strided"] / 2, change
    net = build_generator("unet", 64, 8, unet_depth=3, downsample="blur")
    assert sum(isinstance(m, Blur) for m in net.modules()) == 2  # depth 3: the two levels below the slice's
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown downsampling 'max'"):
        _downsample(8, 16, "max")


def test_generator_dropout_follows_each_inner_decoder_level_and_leaves_inference_alone():
    """--dropout puts a dropout after each decoder level below the slice's own (two at depth 3), none on the
    translation itself. It has no parameters, so a checkpoint loads into the inference graph, built without it,
    and in eval mode both give the same translation; in training mode two passes differ."""
    torch.manual_seed(0)
    net = build_generator("unet", 64, 8, unet_depth=3, upsample="subpixel", dropout=0.3)
    plain = build_generator("unet", 64, 8, unet_depth=3, upsample="subpixel")
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    plain.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain.eval()(x))
        net.train()
        assert (net(x) - net(x)).abs().max() > 1e-3


def test_a_full_resolution_stage_fits_a_one_pixel_nonlinear_map_the_reference_top_does_not():
    """The reference's top level makes each 2x2 block of the output from half-resolution features, so a
    nonlinear map of each pixel's own intensity (a tissue's contrast, on one-pixel structures) is hard for it.
    On white-noise slices, in the same 150 Adam steps, the --unet_full_res stage fits |x| to well under the
    reference top's error. The stage keeps the generator's contract: same output, a scale head, no phases."""

    def fitted_error(full_res: int) -> float:
        torch.manual_seed(0)
        net = build_generator("unet", 32, 8, unet_depth=3, upsample="subpixel", full_res=full_res)
        optimizer = torch.optim.Adam(net.parameters(), 2e-3)
        noise = torch.Generator().manual_seed(0)
        for _ in range(150):
            x = torch.rand(4, 1, 32, 32, generator=noise) * 2 - 1
            loss = torch.nn.functional.l1_loss(net(x), x.abs() * 2 - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        x = torch.rand(8, 1, 32, 32, generator=noise) * 2 - 1
        with torch.no_grad():
            return torch.nn.functional.l1_loss(net(x), x.abs() * 2 - 1).item()

    reference, full_res = fitted_error(0), fitted_error(4)
    assert full_res < 0.75 * reference, (full_res, reference)
    net = build_generator("unet", 64, 8, unet_depth=3, upsample="subpixel", full_res=4, scale_head=True)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    out = net.with_scale(x)
    assert out.shape == (2, 2, 64, 64) and torch.equal(out[:, :1], net(x))
    assert sum(isinstance(m, SubPixelUpsample) for m in net.modules()) == 2  # the inner levels'; the stage's is bilinear
    # without the stage the parameter names are the reference's, so checkpoints from before it load
    assert all(name.startswith("model.") for name in build_generator("unet", 64, 8, unet_depth=3).state_dict())
    with pytest.raises(ValueError, match="needs the unet generator"):
        build_generator("resnet9", 32, 4, full_res=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_slice_built_padding_and_upsampling_compute_what_torchs_kernels_do(dtype):
    """reflect_pad and BilinearUp2x stand in for torch's kernels, which have no deterministic backward on a GPU:
    the same values and gradients, on a size that is neither square nor even."""
    torch.manual_seed(0)
    for ours, theirs in ((lambda x: reflect_pad(x, 3), lambda x: F.pad(x, [3] * 4, mode="reflect")),
                         (BilinearUp2x(), lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))):
        x = torch.randn(2, 3, 7, 10, dtype=dtype, requires_grad=True)
        y = x.detach().clone().requires_grad_()
        a, b = ours(x), theirs(y)
        grad = torch.randn_like(a)
        a.backward(grad), b.backward(grad)
        tolerance = 1e-12 if dtype == torch.float64 else 0.07  # bf16: torch's kernel sums the gradient in another order
        assert a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tolerance, rtol=0)
        assert torch.allclose(x.grad.double(), y.grad.double(), atol=tolerance, rtol=0)
