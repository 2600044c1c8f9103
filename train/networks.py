"""CycleGAN networks after junyanz/pytorch-CycleGAN-and-pix2pix: U-Net and ResNet generators, PatchGAN
discriminator. Every constructor takes plain arguments; nothing reads a global options object."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# smallest Laplace scale a scale head predicts, in the network's [-1,1] units (keeps the likelihood finite)
MIN_SCALE = 1e-3


def to_model_range(images):
    """[0,1] slices -> the generators' [-1,1], their Tanh range (checkpoint.json `input_range`)."""
    return images * 2 - 1


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """The generators' [-1,1] -> [0,1] slices in fp32 (under autocast they come out in bf16 or fp16)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def flip_shift(images: torch.Tensor, flip: bool, shift: tuple[int, int]) -> torch.Tensor:
    """A left-right flip (if `flip`), then a circular shift by (rows, cols) pixels."""
    return (images.flip(-1) if flip else images).roll(shift, dims=(-2, -1))


def unflip_shift(images: torch.Tensor, flip: bool, shift: tuple[int, int]) -> torch.Tensor:
    """The inverse of flip_shift."""
    back = images.roll((-shift[0], -shift[1]), dims=(-2, -1))
    return back.flip(-1) if flip else back


# Reflection padding and bilinear upsampling below are built from slices and concatenations: torch's own
# kernels for them accumulate gradients with atomic adds on a GPU, have no deterministic version, and so make
# --deterministic (bit-exact resume on a GPU) refuse to run. Both compute the same as torch's.

def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """F.pad(x, [pad] * 4, mode="reflect")."""
    for dim in (-1, -2):
        size = x.shape[dim]
        x = torch.cat([x.narrow(dim, 1, pad).flip(dim), x, x.narrow(dim, size - 1 - pad, pad).flip(dim)], dim)
    return x


class ReflectPad2d(nn.Module):
    """nn.ReflectionPad2d(pad) (see reflect_pad)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return reflect_pad(x, self.pad)


class BilinearUp2x(nn.Module):
    """nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False): along each axis, output 2i is
    0.75 x[i] + 0.25 x[i-1] and 2i+1 is 0.75 x[i] + 0.25 x[i+1], the edges repeated."""

    def forward(self, x):
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))  # one rounding under bf16 or fp16, as torch's kernel
        for dim in (-1, -2):
            size = x.shape[dim]
            edged = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, size - 1, 1)], dim)  # x[i-1] and x[i+1] at the edges: x[i]
            before, after = edged.narrow(dim, 0, size), edged.narrow(dim, 2, size)
            pairs = torch.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], dim)
            x = pairs.flatten(dim - 1, dim)  # interleaved: 2i, 2i+1
        return x.to(dtype)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


UPSAMPLE = ("transpose", "resize", "subpixel")
DOWNSAMPLE = ("strided", "blur")


class Blur(nn.Module):
    """A fixed [1, 2, 1] x [1, 2, 1] / 16 low-pass per channel, reflect-padded to keep the size. Before a stride-2
    convolution it removes what the subsampling would alias (Zhang, "Making convolutional networks shift-invariant
    again", ICML 2019), so a one-pixel shift of the input moves the features more than it changes them."""

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 16)[None, None], persistent=False)

    def forward(self, x):
        channels = x.shape[1]
        return F.conv2d(reflect_pad(x, 1), self.kernel.to(x.dtype).expand(channels, 1, 3, 3), groups=channels)


class SubPixelUpsample(nn.Sequential):
    """A 3x3 convolution to four times the channels, then PixelShuffle(2) (Shi et al., CVPR 2016): each of the
    four output phases gets its own kernel. `icnr_` starts the four equal (Aitken et al., 2017), so at
    initialisation it is a convolution then nearest upsampling, free of checkerboard, like `resize`."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__(nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1, bias=bias), nn.PixelShuffle(2))

    @torch.no_grad()
    def icnr_(self, std: float) -> None:
        conv = self[0]
        shared = torch.randn(conv.out_channels // 4, *conv.weight.shape[1:]) * std
        conv.weight.copy_(shared.repeat_interleave(4, dim=0))  # PixelShuffle reads channel 4c + k as phase k of c
        if conv.bias is not None:
            conv.bias.zero_()


def _upsample(in_channels: int, out_channels: int, mode: str, bias: bool) -> nn.Module:
    """x2 upsampling. `transpose` is the reference's 4x4 stride-2 transposed convolution, whose kernel overlaps
    unevenly: odd and even output pixels get different weights, a checkerboard that shows as speckle.
    `resize` is nearest-neighbour upsampling and then a 3x3 convolution (Odena et al., Distill 2016): every
    output pixel gets the same kernel. `subpixel` (SubPixelUpsample) starts as checkerboard-free as `resize`
    at the same cost, and may learn a kernel per output phase."""
    if mode == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=bias)
    if mode == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias))
    if mode == "subpixel":
        return SubPixelUpsample(in_channels, out_channels, bias)
    raise ValueError(f"unknown upsampling {mode!r}: choose one of {', '.join(UPSAMPLE)}")


def _downsample(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """x2 downsampling: the reference's 4x4 stride-2 convolution, after a Blur with `blur`."""
    if mode not in DOWNSAMPLE:
        raise ValueError(f"unknown downsampling {mode!r}: choose one of {', '.join(DOWNSAMPLE)}")
    down = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
    return nn.Sequential(Blur(), down) if mode == "blur" else down


class UNetBlock(nn.Module):
    """One encoder/decoder level: down, the inner levels, up, then concatenate the skip connection."""

    def __init__(self, outer: int, inner: int, submodule: nn.Module | None, in_channels: int | None = None,
                 outermost: bool = False, dropout: float = 0.0, upsample: str = "transpose", downsample: str = "strided"):
        super().__init__()
        self.outermost = outermost
        in_channels = in_channels or outer
        # the slice itself is subsampled by a learnt linear filter that can keep its finest detail; blurring it
        # would discard that, and what aliases is what a nonlinearity adds, so the outermost level stays strided
        down = _downsample(in_channels, inner, "strided" if outermost else downsample)
        up_in = inner if submodule is None else inner * 2
        if outermost:  # raw outputs: UNetGenerator applies the tanh to the translation, not to a scale head
            layers = [down, submodule, nn.ReLU(True), _upsample(up_in, outer, upsample, bias=True)]
        elif submodule is None:  # innermost: 1x1 bottleneck, no norm on a single pixel
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), _upsample(up_in, outer, upsample, bias=False), _norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, _norm(inner), submodule, nn.ReLU(True),
                      _upsample(up_in, outer, upsample, bias=False), _norm(outer)]
        if dropout and not outermost:  # on what this level decodes; the skip concatenated after it passes whole
            layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


def unet_levels(size: int, depth: int = 0) -> int:
    """The stride-2 levels of a U-Net for `size`: `depth`, or down to 1x1 when 0; ValueError where they do not fit."""
    full = int(math.log2(size))
    if 2**full != size or full < 4:
        raise ValueError(f"U-Net needs a power-of-two size >= 16, got {size}")
    depth = depth or full
    if not 2 <= depth <= full:
        raise ValueError(f"U-Net depth must be 2..{full} for size {size} (0 = {full}), got {depth}")
    return depth


class FullResolutionStage(nn.Module):
    """The U-Net's top level at the slice's own resolution, as in Ronneberger et al.'s U-Net (MICCAI 2015),
    where the reference's produces the output straight from its last upsampling. The decoder's last features
    become `width` maps (a 1x1 convolution, then bilinear x2: no checkerboard), are concatenated with the input
    slice and pass two 3x3 convolutions, so every output pixel gets a nonlinear function of its own
    neighbourhood at full resolution (a tissue's intensity map is nonlinear, its finest edges one pixel wide)."""

    def __init__(self, channels: int, features: int, width: int, out_channels: int):
        super().__init__()
        self.up = nn.Sequential(nn.ReLU(True), nn.Conv2d(features, width, 1, bias=False),
                                BilinearUp2x(), _norm(width))
        self.convs = nn.Sequential(nn.Conv2d(width + channels, width, 3, padding=1, bias=False), _norm(width), nn.ReLU(True),
                                   nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x, features):
        return self.convs(torch.cat([x, self.up(features)], 1))


class UNetGenerator(nn.Module):
    """U-Net of `depth` stride-2 levels (the reference's num_downs). By default the depth follows the image
    size: 256x256x1 is encoded down to 1x1x512 and back, so every output pixel sees the whole slice. A
    shallower U-Net stops at a coarser grid: each output pixel's convolutions see about 4 x 2**depth pixels
    across (30 at depth 3, 62 at depth 4), though instance norm still shares statistics over the slice.

    With `scale_head`, the last layer has a second output per channel: the scale b of a Laplace distribution
    around the translation, the generator's own estimate of its error (E|error| = b), as in UGAC (Upadhyay et
    al., MICCAI 2021). forward() gives the translation alone; with_scale() both.

    With `full_res` channels, a FullResolutionStage makes the output instead of the last upsampling."""

    def __init__(self, size: int = 256, channels: int = 1, ngf: int = 64, dropout: float = 0.0, depth: int = 0,
                 scale_head: bool = False, upsample: str = "transpose", downsample: str = "strided", full_res: int = 0):
        super().__init__()
        self.channels, self.scale_head, self.full_res = channels, scale_head, full_res
        depth = unet_levels(size, depth)
        widths = [ngf * min(2**i, 8) for i in range(depth)]  # 64, 128, 256, 512, 512, ...
        sampling = {"upsample": upsample, "downsample": downsample}
        block = UNetBlock(widths[-2], widths[-1], None, dropout=dropout, **sampling)
        for level in range(depth - 2, 0, -1):
            block = UNetBlock(widths[level - 1], widths[level], block, dropout=dropout, **sampling)
        out_channels = channels * (1 + scale_head)
        if full_res:  # the outermost level's down and inner levels, then the stage on their features
            self.trunk = nn.Sequential(_downsample(channels, widths[0], "strided"), block)
            self.top = FullResolutionStage(channels, widths[0] * 2, full_res, out_channels)
        else:
            self.model = UNetBlock(out_channels, widths[0], block, in_channels=channels, outermost=True, **sampling)

    def _raw(self, x):
        return self.top(x, self.trunk(x)) if self.full_res else self.model(x)

    def forward(self, x):
        return torch.tanh(self._raw(x)[:, :self.channels])

    def with_scale(self, x):
        """(N,C,H,W) -> (N,2C,H,W): the translation in [-1,1], then its Laplace scale (> 0, same units)."""
        if not self.scale_head:
            raise ValueError("this generator has no scale head (trained without --lambda_aleatoric)")
        out = self._raw(x)
        return torch.cat([torch.tanh(out[:, :self.channels]), F.softplus(out[:, self.channels:]) + MIN_SCALE], 1)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            ReflectPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), _norm(channels), nn.ReLU(True),
            ReflectPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), _norm(channels))

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Two stride-2 downsamplings, `blocks` residual blocks, two upsamplings (resnet_9blocks by default)."""

    def __init__(self, channels: int = 1, ngf: int = 64, blocks: int = 9):
        super().__init__()
        layers = [ReflectPad2d(3), nn.Conv2d(channels, ngf, 7, bias=False), _norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False), _norm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(ngf * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                       _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [ReflectPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN: a 256x256 input gives a 30x30 map of real/fake logits."""

    def __init__(self, channels: int = 1, ndf: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False), _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Random-normal init (mean 0, std 0.02) as in the seed and the CycleGAN paper; ICNR for sub-pixel upsampling."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, SubPixelUpsample):
            m.icnr_(std)
    return module


def build_generator(arch: str, size: int, ngf: int = 64, unet_depth: int = 0, scale_head: bool = False,
                    upsample: str = "transpose", downsample: str = "strided", dropout: float = 0.0, full_res: int = 0) -> nn.Module:
    if arch == "unet":
        return init_weights(UNetGenerator(size, ngf=ngf, depth=unet_depth, scale_head=scale_head, upsample=upsample,
                                          downsample=downsample, dropout=dropout, full_res=full_res))
    if scale_head or full_res:
        raise ValueError(f"a {'scale head' if scale_head else 'full-resolution stage'} needs the unet generator, not {arch!r}")
    if arch == "resnet9":  # the U-Net's depth, sampling and dropout do not apply (train/main.py refuses a depth or dropout asked for)
        return init_weights(ResnetGenerator(ngf=ngf, blocks=9))
    raise ValueError(f"unknown generator {arch!r}: choose unet or resnet9")


@dataclass(frozen=True)
class GeneratorSpec:
    """What builds a checkpoint's generators: checkpoint.json's `generator` block, written by the trainer and
    read by inference. Checkpoints older than an option lack its key and get the value that they were made with."""

    arch: str
    size: int
    ngf: int
    unet_depth: int = 0  # before --unet_depth: down to 1x1
    scale_head: bool = False
    upsample: str = "transpose"  # before --upsample
    downsample: str = "strided"  # before --downsample
    full_res: int = 0  # before --unet_full_res
    input_range: tuple[int, int] = (-1, 1)  # to_model_range

    # train/main.py's option → the field it sets, for the options the spec takes as they are
    OPTION_FIELDS: ClassVar[dict[str, str]] = {"generator": "arch", "size": "size", "ngf": "ngf", "unet_depth": "unet_depth",
                                               "upsample": "upsample", "downsample": "downsample", "unet_full_res": "full_res"}

    @classmethod
    def from_config(cls, config) -> GeneratorSpec:
        spec = cls(**{field: getattr(config, option) for option, field in cls.OPTION_FIELDS.items()},
                   scale_head=bool(config.lambda_aleatoric))
        return spec if spec.arch == "unet" else replace(spec, full_res=0)  # the default's stage is not asked of a ResNet

    @classmethod
    def options_before(cls) -> dict:
        """The options a checkpoint made before them was built with: their fields' defaults, by option name."""
        made_with = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return {option: made_with[field] for option, field in cls.OPTION_FIELDS.items() if field in made_with}

    @classmethod
    def from_dict(cls, block: dict) -> GeneratorSpec:
        """KeyError for a missing required key, TypeError for an unknown one or a block that is no mapping."""
        spec = cls(**block)
        return replace(spec, input_range=tuple(spec.input_range))

    def to_dict(self) -> dict:
        return {**asdict(self), "input_range": list(self.input_range)}

    def build(self, dropout: float = 0.0) -> nn.Module:
        """The generator; `dropout` (training only: no parameters, so not in the spec) after each inner decoder level."""
        return build_generator(self.arch, self.size, self.ngf, self.unet_depth, self.scale_head, self.upsample, self.downsample,
                               dropout, self.full_res)


def build_discriminator(ndf: int = 64, layers: int = 3) -> nn.Module:
    if layers < 1:
        raise ValueError(f"a PatchGAN needs at least 1 layer, got {layers}")
    return init_weights(PatchDiscriminator(ndf=ndf, layers=layers))


class CycleGenerators(nn.Module):
    """Both generators behind one forward, so DDP sees one call per step whatever the passes inside."""

    def __init__(self, g_ab: nn.Module, g_ba: nn.Module):
        super().__init__()
        self.g_ab, self.g_ba = g_ab, g_ba

    def forward(self, real_a, real_b, identity: bool = True, move: tuple[bool, tuple[int, int]] | None = None,
                back_noise: tuple[float, torch.Generator] | None = None):
        """Translations, reconstructions and, with `identity`, each generator applied to its own target
        contrast (a third of the generators' work, skipped when the identity loss is off). With a `move`
        (flip_shift's arguments), each generator also translates its moved input: moved_fake_b, moved_fake_a.
        With `back_noise` (std, generator), the reconstructions are made from the translations plus that noise.
        Each generator's passes over real images share one batch (instance norm: batching changes nothing).
        Generators with a scale head add the reconstructions' predicted scales, rec_a_scale and rec_b_scale."""
        n = real_a.shape[0]
        out = {}
        for net, real, other, names in ((self.g_ab, real_a, real_b, ("fake_b", "idt_b", "moved_fake_b")),
                                        (self.g_ba, real_b, real_a, ("fake_a", "idt_a", "moved_fake_a"))):
            batch = {names[0]: real, names[1]: other if identity else None, names[2]: flip_shift(real, *move) if move else None}
            batch = {name: images for name, images in batch.items() if images is not None}
            out.update(zip(batch, net(torch.cat(list(batch.values()))).split(n)))
        for rec, net, fake in (("rec_a", self.g_ba, out["fake_b"]), ("rec_b", self.g_ab, out["fake_a"])):
            if back_noise:
                std, generator = back_noise
                fake = fake + std * torch.randn(fake.shape, generator=generator, device=fake.device, dtype=fake.dtype)
            if getattr(net, "scale_head", False):
                out[rec], out[f"{rec}_scale"] = net.with_scale(fake).chunk(2, 1)
            else:
                out[rec] = net(fake)
        return out


class Discriminators(nn.Module):
    def __init__(self, d_a: nn.Module, d_b: nn.Module):
        super().__init__()
        self.d_a, self.d_b = d_a, d_b

    def forward(self, images_a, images_b):
        return self.d_a(images_a), self.d_b(images_b)
