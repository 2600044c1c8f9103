"""Adversarial loss and the discriminators' history pool of generated images (Shrivastava et al. 2017)."""

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
