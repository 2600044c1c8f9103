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


def generator_losses(gens, discs, real_a, real_b, kind: str, lambda_cycle: float, lambda_identity: float):
    """Fool both (frozen) discriminators, cycle back, keep identity. Returns the generated images and the losses;
    losses["G"] is what the generators minimize."""
    fakes = gens(real_a, real_b)
    judged_a, judged_b = discs(fakes["fake_a"], fakes["fake_b"])
    adversarial = gan_loss(judged_a, True, kind) + gan_loss(judged_b, True, kind)
    cycle = lambda_cycle * (F.l1_loss(fakes["rec_a"].float(), real_a) + F.l1_loss(fakes["rec_b"].float(), real_b))
    identity = lambda_cycle * lambda_identity * (F.l1_loss(fakes["idt_a"].float(), real_a) + F.l1_loss(fakes["idt_b"].float(), real_b))
    return fakes, {"G": adversarial + cycle + identity, "G_adv": adversarial, "cycle": cycle, "identity": identity}


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
