"""Checkpoints: what is saved for an exact resume, how a checkpoint folder is written, found, checked and pruned.

A checkpoint is Accelerate's state (optimizers, schedules, data position, RNG, the discriminators, and the
registered TrainState, image pools and schedulers) beside the files inference reads: G_t1_to_t2.safetensors,
G_t2_to_t1.safetensors and checkpoint.json (train/rundir.py). Each generator is stored once, in its G_* file:
without a moving average those are the trained weights, and resume loads them from there; with one they are the
average, and the registered state keeps only its count.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train import rundir
from train.config import ARCHITECTURE_KEYS, Config
from train.networks import CycleGenerators, GeneratorSpec
from train.step import any_rank


@dataclass
class TrainState:
    """Everything besides models/optimizers/RNG that an exact resume needs; saved in every checkpoint."""

    step: int = 0
    nan_steps: int = 0
    bad_in_a_row: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    wandb_id: str = ""  # this run's W&B run: a resumed run continues it, a fresh one in a reused folder gets a new one

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class StateDict:
    """Adapter: anything with state_dict/load_state_dict, registered for Accelerate checkpointing."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self):
        return {k: v.state_dict() for k, v in self.parts.items()}

    def load_state_dict(self, state):
        for k, v in self.parts.items():
            v.load_state_dict(state[k])


class AverageCount:
    """The moving average in the registered state: only its count, since its weights are the G_* files."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {"n_averaged": self.ema.n_averaged}

    def load_state_dict(self, state: dict) -> None:
        if set(state) == {"n_averaged"}:
            self.ema.n_averaged.copy_(state["n_averaged"])
        else:  # a checkpoint written before the average was stored once holds all of it
            self.ema.load_state_dict(state)


def generator_weights(checkpoint: Path) -> dict:
    """Both G_* files as one CycleGenerators state dict."""
    return {f"{prefix}.{k}": v for prefix, direction in (("g_ab", "t1_to_t2"), ("g_ba", "t2_to_t1"))
            for k, v in load_file(str(checkpoint / rundir.GENERATORS[direction])).items()}


def store_generators_once(accelerator, ema) -> None:
    """Hooks that keep Accelerate from saving the generators (prepared first, so models[0]) a second time when the
    G_* files already hold the trained weights, and that restore them, or the average, from those files."""

    def skip_the_copy(models, weights, output_dir):
        if ema is None:
            weights.pop(0)

    def load_from_generator_files(models, input_dir):
        if ema is not None:
            ema.module.load_state_dict(generator_weights(Path(input_dir)))
        elif len(list(Path(input_dir).glob("model*.safetensors"))) < len(models):  # older checkpoints saved them twice
            accelerator.unwrap_model(models.pop(0)).load_state_dict(generator_weights(Path(input_dir)))

    accelerator.register_save_state_pre_hook(skip_the_copy)
    accelerator.register_load_state_pre_hook(load_from_generator_files)


def resolve_resume(config: Config, out: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        found = rundir.list_checkpoints(out)
        return found[-1][1] if found else None
    path = Path(config.resume)
    if not (path / rundir.CHECKPOINT_INFO).is_file():
        raise SystemExit(f"error: --resume {path}: not a checkpoint folder (no {rundir.CHECKPOINT_INFO}); "
                         f"expected RUN/checkpoints/step-NNNNNNN or 'auto'")
    return path


def made_before_options() -> dict:
    """What a checkpoint older than an option was made with: the option's default, except for options whose default
    has changed since: the generator's (GeneratorSpec's defaults: a full-depth U-Net, transposed convolutions, no
    full-resolution stage), and augmentation, which jittered intensities before --augment_intensity."""
    return {**Config.defaults(), **GeneratorSpec.options_before(), "augment_intensity": True}


def check_compatible(path: Path, config: Config) -> dict:
    """Refuse to resume `path` with a different network; return the configuration it was trained with."""
    try:
        saved = rundir.parse_json((path / rundir.CHECKPOINT_INFO).read_text())["config"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: --resume {path}: unreadable {rundir.CHECKPOINT_INFO} ({type(err).__name__}: {err}); "
                         f"it may be truncated: resume from an earlier checkpoint in {path.parent}")
    saved = {**made_before_options(), **saved}
    current = config.to_dict()
    differ = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in ARCHITECTURE_KEYS if saved.get(k) != current[k]]
    if differ:
        raise SystemExit(f"error: --resume {path} was made with a different configuration ({'; '.join(differ)}); "
                         f"start a new run folder or resume with the same options")
    return saved


def check_plain_data(path: Path) -> None:
    """Accelerate unpickles the registered trainer state (custom_checkpoint_*.pkl) with weights_only=False, which
    runs whatever code a crafted file holds. Each must load as plain tensors and numbers first; the rest of a
    checkpoint is safetensors, or loaded weights-only by Accelerate itself."""
    for file in sorted(path.glob("custom_checkpoint_*.pkl")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SystemExit(f"error: --resume {path}: {file.name} holds more than plain tensors and numbers (a weights-only "
                             f"load refused it: {str(err).splitlines()[0][:200]}); refusing to unpickle it. Only resume from "
                             f"checkpoints you trust")


def load_checkpoint(accelerator, path: Path, schedules, config: Config) -> None:
    """Restore a registered training state. The saved optimizers and schedules carry the old rates and betas;
    the options given now win (a lower --lr after a NaN stop), at the saved step's place in the schedule.
    `schedules`: the generators' and the discriminators' schedulers."""
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # a truncated or damaged file: name the checkpoint, not a deep traceback
        raise SystemExit(f"error: --resume {path}: cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                         f"it may be truncated: resume from an earlier checkpoint in {path.parent}") from None
    for sched, lr in zip(schedules, (config.lr, config.lr_d or config.lr)):
        sched.base_lrs = [lr] * len(sched.optimizer.param_groups)
        for group in sched.optimizer.param_groups:
            group.update(initial_lr=lr, lr=lr * sched.lr_lambdas[0](sched.last_epoch), betas=(config.beta1, config.beta2))


def save_checkpoint(accelerator, trained: list, inference_gens: CycleGenerators, out: Path, state: TrainState, epoch: int,
                    config: Config, last: dict, val: dict, preprocessing: dict) -> None:
    """Accelerate state + inference generators (the moving average where kept), written to a hidden folder and
    renamed when complete. `val` holds this step's validation scores, if it validated."""
    score = val.get(rundir.VAL_SCORE)
    if score is not None and score > state.best_score:
        state.best_score, state.best_step = score, state.step
    final = rundir.checkpoint_dir(out, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    failure = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            failure = err
    stop_if_any_failed(accelerator, failure, tmp, out, state.step)  # and the barrier before every rank writes into tmp
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:  # writers word a full disk their own way (torch.save: "enforce fail ... unexpected pos")
        failure = err
    stop_if_any_failed(accelerator, failure, tmp, out, state.step)
    # DDP keeps replicas identical; record each rank's sum of the trained weights so a divergence is visible
    params = [p for net in trained for p in accelerator.unwrap_model(net).parameters()]
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum()
    rank_checksums = accelerator.gather(checksum[None].to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        try:
            if len(set(rank_checksums)) > 1:
                print(f"warning: step {state.step}: trained weights differ across ranks: {rank_checksums}", flush=True)
            for name, net in (("t1_to_t2", inference_gens.g_ab), ("t2_to_t1", inference_gens.g_ba)):
                save_file({k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp / rundir.GENERATORS[name]))
            rundir.write_json(tmp / rundir.CHECKPOINT_INFO, {
                "step": state.step, "epoch": epoch, "time": time.time(), "val": {k: v for k, v in val.items() if k.startswith("val/")},
                "train": last, "config": config.to_dict(), "rank_checksums": rank_checksums,
                "generator": GeneratorSpec.from_config(config).to_dict(),
                "preprocessing": preprocessing,
                **({"wandb": {"project": config.wandb_project, "id": state.wandb_id}} if accelerator.trackers else {})})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except Exception as err:
            failure = err
    stop_if_any_failed(accelerator, failure, tmp, out, state.step)
    if accelerator.is_main_process:
        prune_checkpoints(out, config.checkpoints_total_limit, state.best_step)
    accelerator.wait_for_everyone()


def stop_if_any_failed(accelerator, failure: Exception | None, tmp: Path, out: Path, step: int) -> None:
    """Every rank stops with the error when any rank's part of the write failed, so none is left waiting in a
    collective for a rank that gave up (on one node the launcher would stop it; across nodes nothing would).
    The partial folder is removed."""
    if not any_rank(accelerator, failure is not None):
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise checkpoint_write_error(failure or OSError("another process could not write its part"), out, step) from failure


def checkpoint_write_error(err: Exception, out: Path, step: int) -> SystemExit:
    """A failed checkpoint write, said plainly: a full disk is named as one, whatever the writer's wording."""
    free = shutil.disk_usage(out).free
    full = getattr(err, "errno", None) == errno.ENOSPC or free < 64 * 2**20
    why = "no space left on device" if full else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    kept = rundir.list_checkpoints(out)
    return SystemExit(f"error: cannot write the step-{step} checkpoint into {out} ({why}; {free / 2**20:.0f} MiB free there); "
                      "no partial checkpoint is left behind. " + (f"The newest complete checkpoint is {kept[-1][1]}." if kept
                                                                   else "No checkpoint was written yet."))


def prune_checkpoints(out: Path, keep: int, best_step: int) -> None:
    found = rundir.list_checkpoints(out)
    for step, path in found[:-keep] if keep > 0 else []:
        if step != best_step:
            shutil.rmtree(path)
