"""CycleGAN objectives (Zhu et al. 2017), the structure losses that keep anatomy (MIND, PatchNCE) and the
discriminators' history pool of generated images (Shrivastava et al. 2017)."""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from train.networks import flip_shift


def gan_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """'bce': BCE with logits against all-ones/all-zeros (the seed's loss); 'lsgan': least squares."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if kind == "lsgan":
        return F.mse_loss(logits.float(), target.float())
    raise ValueError(f"unknown gan_loss {kind!r}")


def mind(images: torch.Tensor, dilation: int = 2, noise_floor: float = 0.0) -> torch.Tensor:
    """2D MIND descriptor (Heinrich et al. 2012): for each pixel, Gaussian-weighted patch distances to its four
    neighbours at `dilation` pixels, divided by their local mean and mapped through exp(-d/v). It describes
    local structure independently of the contrast, so T1 and T2 of the same anatomy give similar descriptors.

    In flat tissue the distances are the image's noise, and exp(-d/v) describes its random pattern at full
    contrast: matched against a noisy input, that rewards a translation for copying the input's noise. A
    `noise_floor` K > 0 keeps v at least K times the image's noise level, so distances within K times the noise
    describe nothing while any edge well above the noise, however weak beside the image's strong edges, still
    does. The noise level is v's tenth percentile over the head (model-range pixels above -0.9): the flattest
    tissue, where v is the noise alone (docs/fidelity.md, "Where the last tenth of SSIM goes")."""
    x = images.float()
    kernel = torch.tensor([0.25, 0.5, 0.25], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :])[None, None]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    h, w = x.shape[-2:]
    d = dilation
    distances = []
    for dy, dx in ((0, d), (d, 0), (0, -d), (-d, 0)):
        shifted = padded[..., d + dy:d + dy + h, d + dx:d + dx + w]
        distances.append(F.conv2d(F.pad((x - shifted) ** 2, [1] * 4, mode="replicate"), kernel))
    distances = torch.cat(distances, 1)
    variance = distances.mean(1, keepdim=True)
    mean_variance = variance.mean(dim=(1, 2, 3), keepdim=True)
    floor = mean_variance * 0.001 + 1e-6
    if noise_floor:
        in_head = torch.where(x.detach() > -0.9, variance.detach(), torch.nan)
        noise_level = in_head.flatten(1).nanquantile(0.1, dim=1).nan_to_num(0.0).view(-1, 1, 1, 1)
        floor = torch.maximum(floor, noise_floor * noise_level)
    variance = torch.maximum(torch.minimum(variance, mean_variance * 1000), floor)
    descriptor = torch.exp(-distances / variance)
    return descriptor / descriptor.amax(1, keepdim=True)


class PatchNCE(nn.Module):
    """Patch contrastive loss of CUT (Park et al., *Contrastive learning for unpaired image-to-image translation*,
    ECCV 2020), both ways as in DCLGAN (Han et al., CVPR Workshops 2021): a patch of the translation, seen by the
    generator that takes it back, should match the input's patch at the same place (seen by the generator that
    made the translation) better than the input's other patches. Features are the outputs of each generator's
    first `layers` convolutions (the encoder), projected by a small MLP per layer; the projection heads are the
    only weights this adds, and they train with the generators.

    The features are recorded in the cycle's own passes (`recording`), so the loss costs no extra generator
    pass: G_ab reads the real T1, then on the way back the T1 that G_ba made; G_ba the same for T2."""

    def __init__(self, g_ab: nn.Module, g_ba: nn.Module, layers: int = 4, patches: int = 256, dim: int = 256,
                 temperature: float = 0.07):
        super().__init__()
        # a plain dict, so the generators' convolutions are not registered (and trained, saved) a second time here
        self.taps = {name: [m for m in net.modules() if type(m) is nn.Conv2d][:layers] for name, net in (("g_ab", g_ab), ("g_ba", g_ba))}
        self.heads = nn.ModuleDict({name: nn.ModuleList(
            nn.Sequential(nn.Linear(conv.out_channels, dim), nn.ReLU(), nn.Linear(dim, dim)) for conv in convs)
            for name, convs in self.taps.items()})
        self.patches, self.temperature = patches, temperature

    @contextmanager
    def recording(self):
        """Within the block, each call of a generator appends [its tapped features, one per layer] to
        calls[name]."""
        calls = {name: [] for name in self.taps}
        handles = []
        for name, convs in self.taps.items():
            for layer, conv in enumerate(convs):
                def record(module, args, output, name=name, layer=layer):
                    if layer == 0:
                        calls[name].append([])
                    calls[name][-1].append(output)
                handles.append(conv.register_forward_hook(record))
        try:
            yield calls
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, calls: dict, n: int) -> torch.Tensor:
        """Mean InfoNCE over layers and both directions. calls[name][0] is the generator's pass over its real
        input (the first n images; identity and moved passes may follow in the same batch), calls[name][1] its pass over
        the other generator's translation."""
        losses = []
        for made_by, taken_back_by in (("g_ab", "g_ba"), ("g_ba", "g_ab")):
            for layer, (source, translated) in enumerate(zip(calls[made_by][0], calls[taken_back_by][1])):
                source = source[:n].flatten(2).transpose(1, 2)  # B x HW x C
                translated = translated.flatten(2).transpose(1, 2)
                places = torch.randperm(source.shape[1], device=source.device)[:self.patches]
                keys = F.normalize(self.heads[made_by][layer](source.index_select(1, places).float()), dim=-1).detach()
                queries = F.normalize(self.heads[taken_back_by][layer](translated.index_select(1, places).float()), dim=-1)
                logits = queries @ keys.transpose(1, 2) / self.temperature  # B x P x P: the diagonal is the same place
                # cross-entropy with the diagonal as the class, written out: CUDA's nll_loss has no deterministic version
                losses.append((logits.logsumexp(-1) - logits.diagonal(dim1=-2, dim2=-1)).mean())
        return torch.stack(losses).mean()


@dataclass(frozen=True)
class Objective:
    """The generators' objective: the adversarial loss's kind and each term's weight (0 = the term is off).
    `identity` is a fraction of `cycle`, as in the reference."""

    gan: str = "lsgan"
    adv: float = 1.0
    cycle: float = 5.0
    identity: float = 0.0
    structure: float = 0.0
    nce: float = 0.0
    aleatoric: float = 0.0
    equivariance: float = 0.0
    cycle_noise: float = 0.0  # not a weight: the std of the noise on the translations the cycle takes back
    equivariance_warmup: int = 0  # steps over which `equivariance` rises linearly from 0
    mind_noise_floor: float = 0.0  # not a weight: mind()'s noise_floor

    @classmethod
    def from_config(cls, config) -> Objective:
        return cls(config.gan_loss, config.lambda_adv, config.lambda_cycle, config.lambda_identity, config.lambda_structure,
                   config.lambda_nce, config.lambda_aleatoric, config.lambda_equivariance, config.cycle_noise,
                   config.equivariance_warmup, config.mind_noise_floor)

    def at(self, step: int) -> Objective:
        """The weights of `step` (0-based): the equivariance term's weight rises over the warm-up, from 0 at step 0."""
        if step >= self.equivariance_warmup:
            return self
        return replace(self, equivariance=self.equivariance * step / self.equivariance_warmup)


# the equivariance term's moves: shifts up to a U-Net depth 3's stride (8) reach every phase of its grid
MAX_SHIFT = 4


def move_at(step: int, seed: int) -> tuple[bool, tuple[int, int]]:
    """The equivariance term's flip_shift arguments for a step: a left-right flip half the time and a shift of
    up to MAX_SHIFT pixels along each axis, drawn from (seed, step) alone, so a resumed run draws the same."""
    rng = random.Random(seed * 1_000_003 + step)
    return rng.random() < 0.5, (rng.randint(-MAX_SHIFT, MAX_SHIFT), rng.randint(-MAX_SHIFT, MAX_SHIFT))


def step_seed(step: int, seed: int, rank: int) -> int:
    """One step's seed on one rank, from those alone: a resumed run draws the same without checkpointing an RNG,
    and ranks draw their own."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def noise_at(step: int, seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The cycle noise's generator for one step on one rank (step_seed)."""
    return torch.Generator(device).manual_seed(step_seed(step, seed, rank))


@contextmanager
def dropout_masks_at(step: int, seed: int, rank: int, device: torch.device, enabled: bool = True):
    """nn.Dropout draws from the global RNG: inside this, that RNG is seeded by step_seed and restored after, so a
    resumed run draws the same masks, ranks draw different ones, and nothing else that draws from it is moved."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        torch.manual_seed(step_seed(step, seed, rank))
        yield


def generator_losses(gens, discs, real_a, real_b, objective: Objective, nce: nn.Module | None = None,
                     move: tuple[bool, tuple[int, int]] | None = None, noise: torch.Generator | None = None):
    """Fool both (frozen) discriminators, cycle back, keep identity and (optionally) structure: MIND and/or
    PatchNCE (`nce`, possibly wrapped for DDP); fit the scale heads, if any, to the cycle's error; with
    `objective.equivariance`, translate the inputs moved by `move` (flip_shift's arguments) as the translations
    moved alike; with `objective.cycle_noise`, take back translations with noise drawn from `noise` (noise_at).
    Returns the generated images and the losses; losses["G"] is what the generators minimize."""
    w = objective
    if w.equivariance and move is None:
        raise ValueError("the equivariance term needs a move (losses.move_at)")
    if w.cycle_noise and noise is None:
        raise ValueError("cycle noise needs a generator to draw it from (losses.noise_at)")
    zero = torch.zeros((), device=real_a.device)
    patch_nce = getattr(nce, "module", nce)
    with patch_nce.recording() if w.nce else nullcontext() as calls:
        fakes = gens(real_a, real_b, identity=bool(w.identity), move=move if w.equivariance else None,
                     back_noise=(w.cycle_noise, noise) if w.cycle_noise else None)
    judged_a, judged_b = discs(fakes["fake_a"], fakes["fake_b"])
    adversarial = w.adv * (gan_loss(judged_a, True, w.gan) + gan_loss(judged_b, True, w.gan))
    cycle = w.cycle * (F.l1_loss(fakes["rec_a"].float(), real_a) + F.l1_loss(fakes["rec_b"].float(), real_b))
    identity = structure = aleatoric = equivariance = zero
    if w.identity:
        identity = w.cycle * w.identity * (F.l1_loss(fakes["idt_a"].float(), real_a) + F.l1_loss(fakes["idt_b"].float(), real_b))
    if w.structure:  # structure-constrained CycleGAN (Yang et al. 2018): MIND of input vs. translation
        described = partial(mind, noise_floor=w.mind_noise_floor)
        structure = w.structure * (F.l1_loss(described(fakes["fake_b"]), described(real_a))
                                   + F.l1_loss(described(fakes["fake_a"]), described(real_b)))
    patch = w.nce * nce(calls, real_a.shape[0]) if w.nce else zero
    if w.aleatoric:
        aleatoric = w.aleatoric * (laplace_nll(real_a, fakes["rec_a"], fakes["rec_a_scale"])
                                   + laplace_nll(real_b, fakes["rec_b"], fakes["rec_b_scale"]))
    if w.equivariance:  # transformation consistency (Mustafa & Mantiuk, ECCV 2020): what --tta averages away is penalized
        equivariance = w.equivariance * sum(F.l1_loss(fakes[f"moved_{fake}"].float(), flip_shift(fakes[fake], *move).float())
                                            for fake in ("fake_a", "fake_b"))
    return fakes, {"G": adversarial + cycle + identity + structure + patch + aleatoric + equivariance, "G_adv": adversarial,
                   "cycle": cycle, "identity": identity, "structure": structure, "nce": patch, "aleatoric": aleatoric,
                   "equivariance": equivariance}


def laplace_nll(target: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `target` under Laplace(mean, scale), up to a constant: fits the scale to
    the error |target - mean|. The mean is detached, so only the scale learns from it: the translation keeps its
    L1 losses (UGAC also divides the mean's error by the scale, which lets a generator give up on hard pixels)."""
    return ((target - mean.detach()).abs().float() / scale.float() + scale.float().log()).mean()


def discriminator_losses(discs, real_a, real_b, fake_a, fake_b, kind: str) -> dict[str, torch.Tensor]:
    """(real + fake) / 2 per discriminator; losses["D"] is their sum."""
    n = real_a.shape[0]
    logits_a, logits_b = discs(torch.cat([real_a, fake_a]), torch.cat([real_b, fake_b]))
    d_t1 = (gan_loss(logits_a[:n], True, kind) + gan_loss(logits_a[n:], False, kind)) / 2
    d_t2 = (gan_loss(logits_b[:n], True, kind) + gan_loss(logits_b[n:], False, kind)) / 2
    return {"D": d_t1 + d_t2, "D_t1": d_t1, "D_t2": d_t2}


class ImagePool:
    """Returns a batch where each image is, with probability 1/2 once the pool is full, swapped for an older
    generated image. The pool is part of the checkpoint so a resumed run continues with the same history."""

    def __init__(self, size: int = 50, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image[None]
            if len(self.images) < self.size:
                self.images.append(image.cpu())
                out.append(image)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.images[index].to(image.device, image.dtype))
                self.images[index] = image.cpu()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": self.images, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"])
        self.rng.setstate(state["rng"])
