"""The CycleGAN being trained and its one training step, shared by the trainer (train/main.py),
bench/train_bench.py and the tests, so that what is measured is what trains.

A = T1, B = T2. G_ab translates T1 to T2, G_ba T2 to T1; D_a judges T1 images, D_b T2 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.config import Config
from train.losses import (ImagePool, Objective, PatchNCE, discriminator_losses, dropout_masks_at, generator_losses, move_at,
                          noise_at)
from train.networks import CycleGenerators, Discriminators, GeneratorSpec, build_discriminator


@dataclass
class CycleGAN:
    """What one step updates: networks and optimizers prepared by Accelerate, schedules, history pools, and the
    moving average of the generators where kept."""

    gens: nn.Module
    discs: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR
    pools: dict[str, ImagePool]
    nce: nn.Module | None
    ema: AveragedModel | None
    trained_gens: CycleGenerators  # gens unwrapped from DDP
    objective: Objective
    seed: int  # with the step, draws the equivariance term's moves, the cycle noise and the dropout masks
    dropout: float  # the generators' (training only)
    max_grad_norm: float  # 0 = no clipping

    @property
    def inference_gens(self) -> CycleGenerators:
        """What validation, checkpoints and inference use: the trained generators or their moving average."""
        return self.ema.module if self.ema else self.trained_gens


def linear_decay(total_steps: int, decay_start: float):
    """LR factor: 1 for the first decay_start of the steps, then linearly down to 0 at the last step."""
    start = total_steps * decay_start
    span = max(total_steps - start, 1)
    return lambda step: 1.0 if step < start else max(0.0, 1.0 - (step - start) / span)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True if `flag` is set on any process (keeps every rank taking the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def build_cycle_gan(accelerator: Accelerator, config: Config, total_steps: int) -> CycleGAN:
    """The CycleGAN of `config` at config.size (resolved: not 0)."""
    gens = CycleGenerators(*(GeneratorSpec.from_config(config).build(config.dropout) for _ in range(2)))
    discs = Discriminators(build_discriminator(config.ndf, config.disc_layers), build_discriminator(config.ndf, config.disc_layers))
    if config.channels_last:
        gens, discs = gens.to(memory_format=torch.channels_last), discs.to(memory_format=torch.channels_last)
    nce = PatchNCE(gens.g_ab, gens.g_ba) if config.lambda_nce else None
    # one fused kernel per step instead of a loop of small ones: 11% of the demo's step on CPU
    adam = {"lr": config.lr, "betas": (config.beta1, config.beta2), "fused": accelerator.device.type in ("cpu", "cuda")}
    opt_g = torch.optim.Adam([*gens.parameters(), *(nce.parameters() if nce else [])], **adam)
    opt_d = torch.optim.Adam(discs.parameters(), **{**adam, "lr": config.lr_d or config.lr})
    # schedulers are stepped once per optimizer step on every rank: kept out of prepare(), which would step them world times
    lr_factor = linear_decay(total_steps, config.lr_decay_start)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_factor)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_factor)
    # the generators are prepared first (checkpoint hooks rely on it); PatchNCE's heads come last
    gens, discs, opt_g, opt_d, *heads = accelerator.prepare(gens, discs, opt_g, opt_d, *([nce] if nce else []))
    pools = {"a": ImagePool(config.pool_size, config.seed), "b": ImagePool(config.pool_size, config.seed + 1)}
    trained_gens = accelerator.unwrap_model(gens)
    ema = AveragedModel(trained_gens, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    return CycleGAN(gens, discs, opt_g, opt_d, sched_g, sched_d, pools, heads[0] if heads else None, ema, trained_gens,
                    Objective.from_config(config), config.seed, config.dropout, config.max_grad_norm)


def train_step(accelerator: Accelerator, model: CycleGAN, real_a: torch.Tensor, real_b: torch.Tensor, step: int
               ) -> dict[str, torch.Tensor] | None:
    """One optimizer step of both generators, then of both discriminators, then the moving average and the
    schedules. Returns the step's losses and gradient norms, or None when a loss was NaN or inf on any rank: every
    rank then skips the rest of the step (after a bad generator loss nothing is updated; after a bad discriminator
    loss the generators' update stands, and the average and schedules do not move)."""
    # generators against frozen discriminators (unwrapped: D's DDP hooks stay out of G's backward)
    discs_plain = accelerator.unwrap_model(model.discs)
    discs_plain.requires_grad_(False)
    objective = model.objective.at(step)
    rank, device = accelerator.process_index, real_a.device
    with accelerator.autocast(), dropout_masks_at(step, model.seed, rank, device, enabled=bool(model.dropout)):
        move = move_at(step, model.seed) if objective.equivariance else None
        noise = noise_at(step, model.seed, rank, device) if objective.cycle_noise else None
        fakes, losses_g = generator_losses(model.gens, discs_plain, real_a, real_b, objective, model.nce, move, noise)
    discs_plain.requires_grad_(True)
    if any_rank(accelerator, not torch.isfinite(losses_g["G"]).item()):
        return skip(model)
    model.opt_g.zero_grad(set_to_none=True)
    accelerator.backward(losses_g["G"])
    grad_norm_g = clip_gradients(accelerator, model.opt_g, model.max_grad_norm)
    model.opt_g.step()

    # discriminators: real vs. generated (from the history pool), (real + fake) / 2
    fake_a = model.pools["a"].query(fakes["fake_a"].detach())
    fake_b = model.pools["b"].query(fakes["fake_b"].detach())
    with accelerator.autocast():
        losses_d = discriminator_losses(model.discs, real_a, real_b, fake_a, fake_b, objective.gan)
    if any_rank(accelerator, not torch.isfinite(losses_d["D"]).item()):
        return skip(model)
    model.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(losses_d["D"])
    grad_norm_d = clip_gradients(accelerator, model.opt_d, model.max_grad_norm)
    model.opt_d.step()

    if model.ema:
        model.ema.update_parameters(model.trained_gens)
    model.sched_g.step()
    model.sched_d.step()
    return {**losses_g, **losses_d, "grad_norm/G": grad_norm_g, "grad_norm/D": grad_norm_d}


def clip_gradients(accelerator: Accelerator, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """The total L2 norm of the optimizer's gradients (already all-reduced, so every rank's is the same), and the
    gradients clipped to max_norm where it is set. Only this optimizer is unscaled under fp16: Accelerate's
    clip_grad_norm_ unscales every prepared one."""
    accelerator.unscale_gradients(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def skip(model: CycleGAN) -> None:
    model.opt_g.zero_grad(set_to_none=True)
    model.opt_d.zero_grad(set_to_none=True)
