"""What the training loop watches between steps: the window of losses and gradient norms that each logged row
reports, and the warnings of a run going wrong while it can still be mended (a discriminator that has won, a
gradient spike). train/main.py feeds them each step and each logged row."""

from __future__ import annotations

import statistics
import time
from collections import deque

import torch
from accelerate import Accelerator

from train import rundir


class LossWindow:
    """The steps since the last logged row: their mean losses (over every rank), their largest gradient norms (a
    spike of one step would vanish in a mean) and images per second."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.losses = torch.zeros(len(rundir.LOSSES), device=accelerator.device)
        self.grad_norms = torch.zeros(len(rundir.GRAD_NORMS), device=accelerator.device)
        self.steps, self.images, self.start = 0, 0, time.time()

    def add(self, step: dict[str, torch.Tensor], images: int) -> None:
        self.losses += torch.stack([step[k] for k in rundir.LOSSES]).detach().float()
        norms = torch.stack([step[k] for k in rundir.GRAD_NORMS]).float()
        # under fp16 an overflowed step is one the gradient scaler skips while it settles its scale: not a spike
        torch.maximum(self.grad_norms, torch.where(norms.isfinite(), norms, 0.0), out=self.grad_norms)
        self.steps, self.images = self.steps + 1, self.images + images

    def means(self) -> dict[str, float]:
        """`loss/<name>` means, the largest gradient norms and images_per_s over the window, which then starts again."""
        losses = self.losses / max(self.steps, 1)
        losses = self.accelerator.reduce(losses, reduction="mean") if self.accelerator.num_processes > 1 else losses
        row = {**{f"loss/{k}": v.item() for k, v in zip(rundir.LOSSES, losses)},
               **{k: v.item() for k, v in zip(rundir.GRAD_NORMS, self.grad_norms)},
               "images_per_s": self.images / max(time.time() - self.start, 1e-9)}
        self.losses.zero_()
        self.grad_norms.zero_()
        self.steps, self.images, self.start = 0, 0, time.time()
        return row


class DiscriminatorWatch:
    """Warns once per discriminator that has won for WINDOW steps: its loss under WON, where a training run's
    stays at 0.1-0.5. The generator it judges then learns from the cycle and structure terms alone, which a flat
    or an inverted translation can satisfy (docs/fidelity.md, "Discriminators that win early")."""

    WON, WINDOW = 0.03, 100
    JUDGES = {f"D_{target}": direction for direction, (_, target) in rundir.DIRECTIONS.items()}  # D_t1 judges translations to T1

    def __init__(self):
        self.since: dict[str, int | None] = dict.fromkeys(self.JUDGES)
        self.warned: set[str] = set()

    def check(self, step: int, row: dict[str, float]) -> list[str]:
        warnings = []
        for disc, direction in self.JUDGES.items():
            if row[f"loss/{disc}"] >= self.WON:
                self.since[disc] = None
                continue
            since = self.since[disc] = step if self.since[disc] is None else self.since[disc]
            if disc not in self.warned and step - since >= self.WINDOW:
                self.warned.add(disc)
                warnings.append(f"warning: step {step}: the {disc.removeprefix('D_').upper()} discriminator's loss has stayed under "
                                f"{self.WON} since step {since}: it has won, and the {rundir.LABELS[direction]} generator now "
                                "learns from the cycle and structure terms alone, which a flat or inverted translation can "
                                "satisfy. If validation SSIM stops rising, restart with another --seed or a slower --lr_d, or "
                                "augment a small training set (docs/fidelity.md, \"Discriminators that win early\")")
        return warnings


class GradientSpikeWatch:
    """Warns of a logged row whose largest gradient norm is SPIKE times the median of the rows before it. In one
    run at the reference's width and batch, one such step of the T2 discriminator (36 times its median, then the
    generators' 111 times) started a collapse the run never recovered from; healthy runs stayed under 6 times
    (docs/training.md, "Gradient spikes")."""

    SPIKE, HISTORY, FIRST = 10.0, 500, 20  # rows: the median is of the last HISTORY, and starts after FIRST
    SIDES = {"grad_norm/G": "generators'", "grad_norm/D": "discriminators'"}

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        self.history = {name: deque(maxlen=self.HISTORY) for name in rundir.GRAD_NORMS}

    def check(self, step: int, row: dict[str, float]) -> list[str]:
        warnings = []
        medians = {name: statistics.median(history) for name, history in self.history.items() if len(history) >= self.FIRST}
        for name, history in self.history.items():
            norm = row[name]
            if name in medians and norm > self.SPIKE * medians[name]:
                limit = 5 * max(medians.values())
                bound = (f"--max_grad_norm {self.max_grad_norm:g} clipped it" if self.max_grad_norm else
                         f"--max_grad_norm (about {limit:.3g}, 5 times the larger median) bounds such a step")
                warnings.append(f"warning: step {step}: the {self.SIDES[name]} gradient norm reached {norm:.3g}, "
                                f"{norm / medians[name]:.0f} times its median of {medians[name]:.3g}. One such step can "
                                f"unsettle Adam for thousands of steps; {bound}. If validation falls from here, resume "
                                "from a checkpoint before it with that option (docs/training.md, \"Gradient spikes\")")
            history.append(norm)
        return warnings
