"""CycleGAN objectives (Zhu et al. 2017) and the discriminators' history pool of generated images
(Shrivastava et al. 2017)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def gan_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """'bce': BCE with logits against all-ones/all-zeros (the seed's loss); 'lsgan': least squares."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if kind == "lsgan":
        return F.mse_loss(logits.float(), target.float())
    raise ValueError(f"unknown gan_loss {kind!r}")


def mind(images: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """2D MIND descriptor (Heinrich et al. 2012): for each pixel, Gaussian-weighted patch distances to its four
    neighbours at `dilation` pixels, divided by their local mean and mapped through exp(-d/v). It describes
    local structure independently of the contrast, so T1 and T2 of the same anatomy give similar descriptors."""
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
    variance = torch.maximum(torch.minimum(variance, mean_variance * 1000), mean_variance * 0.001 + 1e-6)
    descriptor = torch.exp(-distances / variance)
    return descriptor / descriptor.amax(1, keepdim=True)


def generator_losses(gens, discs, real_a, real_b, kind: str, lambda_cycle: float, lambda_identity: float,
                     lambda_structure: float = 0.0):
    """Fool both (frozen) discriminators, cycle back, keep identity and (optionally) structure. Returns the
    generated images and the losses; losses["G"] is what the generators minimize."""
    fakes = gens(real_a, real_b, identity=bool(lambda_identity))
    judged_a, judged_b = discs(fakes["fake_a"], fakes["fake_b"])
    adversarial = gan_loss(judged_a, True, kind) + gan_loss(judged_b, True, kind)
    cycle = lambda_cycle * (F.l1_loss(fakes["rec_a"].float(), real_a) + F.l1_loss(fakes["rec_b"].float(), real_b))
    identity = structure = torch.zeros((), device=real_a.device)
    if lambda_identity:
        identity = lambda_cycle * lambda_identity * (F.l1_loss(fakes["idt_a"].float(), real_a) + F.l1_loss(fakes["idt_b"].float(), real_b))
    if lambda_structure:  # structure-constrained CycleGAN (Yang et al. 2018): MIND of input vs. translation
        structure = lambda_structure * (F.l1_loss(mind(fakes["fake_b"]), mind(real_a)) + F.l1_loss(mind(fakes["fake_a"]), mind(real_b)))
    return fakes, {"G": adversarial + cycle + identity + structure, "G_adv": adversarial, "cycle": cycle,
                   "identity": identity, "structure": structure}


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
