"""Train a T1<->T2 CycleGAN on WebDataset shards.

    accelerate launch train/main.py --data data/shards --out runs/NAME [--config FILE.yaml] [--option value ...]
    python train/main.py ...                      (one process)

A = T1, B = T2. G_ab translates T1 to T2, G_ba T2 to T1; D_a judges T1 images, D_b T2 images.
See docs/training.md for the options and docs/run-folder.md for what lands in --out.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from shards.format import ShardsError, shards_preprocessing
from train import rundir, tracking
from train.checkpoints import (AverageCount, StateDict, TrainState, check_compatible, check_plain_data, load_checkpoint,
                               resolve_resume, save_checkpoint, store_generators_once)
from train.config import Config, load_config, save_config
from train.data import check_shards, evenly_spaced, resolve_augment, train_loaders, val_samples
from train.inference import Translator
from train.metrics import brightness, brightness_sums, slice_metrics
from train.monitor import DiscriminatorWatch, GradientSpikeWatch, LossWindow
from train.networks import CycleGenerators, from_model_range, to_model_range, unet_levels
from train.step import any_rank, build_cycle_gan, train_step


class StopRequested:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) or a RUN/STOP file: finish the step, checkpoint, exit cleanly.
    The file reaches every node through the shared run folder, with no signal forwarding through launchers."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        print(f"received {signal.Signals(signum).name}: checkpointing at the end of this step", flush=True)
        self.flag = True


UNET_ONLY_OPTIONS = ("unet_depth", "dropout", "unet_full_res", "lambda_aleatoric")


def check_options(config: Config) -> None:
    """Options that contradict each other, the image size or the machine: a one-line error naming the option."""
    # a default stands for "not asked for" with another generator, the depth's 3 included (--upsample and
    # --downsample are the U-Net decoder's and encoder's only)
    if config.generator != "unet":
        for name in UNET_ONLY_OPTIONS:
            if getattr(config, name) != Config.defaults()[name]:
                raise SystemExit(f"error: --{name} {getattr(config, name)}: needs --generator unet, not {config.generator}")
    elif config.unet_depth:
        try:
            unet_levels(config.size, config.unet_depth)
        except ValueError as err:
            raise SystemExit(f"error: --unet_depth {config.unet_depth}: {err}")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("error: --mixed_precision fp16 needs a GPU and none is visible (whether the flag or the launcher asked "
                         "for it); use bf16 or no on CPU")


def main(argv=None) -> int:
    config = load_config(argv)
    # the flag wins; without it, what `accelerate launch` was given (its flag or config file), else fp32.
    # Passing Accelerator an explicit "no" would silently override the launcher.
    config = dataclasses.replace(config, mixed_precision=config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
                                 data=str(Path(config.data).resolve()))  # config.yaml is read from elsewhere (the dashboard)
    try:
        manifest = check_shards(config.data, config.size or None, config.allow_partial)
    except ShardsError as err:
        raise SystemExit(f"error: {err}")
    config = dataclasses.replace(config, size=config.size or manifest["image_size"])  # from here on, the size trained at
    preprocessing = shards_preprocessing(manifest, config.size)  # recorded in checkpoints: translate applies what the shards had
    out = Path(config.out)
    if config.resume and config.resume != "auto" and not Path(config.resume).exists():
        raise SystemExit(f"error: --resume {config.resume}: no such checkpoint folder")

    check_options(config)

    mode = tracking.wandb_mode(config.report_to, config.wandb)
    os.environ["WANDB_MODE"] = mode
    # `accelerate launch --multi_gpu` on a node without GPUs: run the processes on CPU over gloo
    cpu_processes = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    if config.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = Accelerator(cpu=cpu_processes, mixed_precision=config.mixed_precision,
                              log_with=None if mode == "disabled" else "wandb", project_dir=str(out))
    set_seed(config.seed, device_specific=False, deterministic=config.deterministic)  # identical initial weights on every rank
    is_main = accelerator.is_main_process
    resume_path = resolve_resume(config, out)
    resumed_config = {}
    if resume_path:
        resumed_config = check_compatible(resume_path, config)
        check_plain_data(resume_path)
    elif existing := rundir.list_checkpoints(out):  # a fresh run here would prune, and later resume, another run's checkpoints
        raise SystemExit(f"error: --out {out} already holds checkpoints (step {existing[-1][0]}); "
                         f"continue that run with --resume auto, or train into a new folder")

    world = accelerator.num_processes
    steps_per_epoch = config.steps_per_epoch or max(1, min(manifest["splits"]["train"]["slices"].values()) // (config.batch_size * world))
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    augment, note = resolve_augment(manifest, config, total_steps, world, resumed_config)
    config = dataclasses.replace(config, augment=augment)  # config.yaml records the one used
    if note:
        accelerator.print(note)
    model = build_cycle_gan(accelerator, config, total_steps)
    state = TrainState()
    kept = StateDict(train=state, sched_g=model.sched_g, sched_d=model.sched_d, pool_a=model.pools["a"], pool_b=model.pools["b"],
                     **({"ema": AverageCount(model.ema)} if model.ema else {}))
    accelerator.register_for_checkpointing(kept)
    store_generators_once(accelerator, model.ema)
    if resume_path:
        load_checkpoint(accelerator, resume_path, (model.sched_g, model.sched_d), config)
        accelerator.print(f"resumed from {resume_path} at step {state.step}")
    state.wandb_id = state.wandb_id or tracking.new_run_id(config.run_name or out.name)

    try:
        loaders = train_loaders(config, accelerator.process_index, world, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        val = val_samples(config.data, "val", config.val_max_slices)
    except ShardsError as err:
        raise SystemExit(f"error: {err}")
    previews = evenly_spaced(val, config.preview_slices)
    if is_main:  # only once the checks, the resume and reading val have passed: a refused run leaves the folder as it was
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / rundir.CONFIG)
        (out / rundir.STOP).unlink(missing_ok=True)  # a stop request left from an earlier run is stale
    metrics_log = rundir.MetricsLog(out, state.step if resume_path else None) if is_main else None
    if is_main and not resume_path and (out / rundir.METRICS).exists():
        (out / rundir.METRICS).unlink()  # a fresh run in a reused folder starts a fresh curve
    if mode != "disabled":  # the config as resolved: what the run really does, not what was left at 0
        resolved = {**config.to_dict(), "steps_per_epoch": steps_per_epoch, "max_steps": total_steps,
                    "world_size": world, "global_batch_size": config.batch_size * world}
        tracking.start(accelerator, config, resolved, out, state.wandb_id)

    trace = None
    if config.trace_keys:
        rundir.trace_path(out, accelerator.process_index).parent.mkdir(parents=True, exist_ok=True)
        trace = open(rundir.trace_path(out, accelerator.process_index), "a" if resume_path else "w")
    stop = StopRequested()
    bar = tqdm(total=total_steps, initial=state.step, disable=not is_main, desc="train", unit="step")
    heartbeat = rundir.Heartbeat(out, lambda: {"step": state.step, "total_steps": total_steps,
                                               "best_checkpoint_step": state.best_step}).start() if is_main else None
    skipped_by_slot: dict[int, int] = {}
    window, discriminators, spikes = LossWindow(accelerator), DiscriminatorWatch(), GradientSpikeWatch(config.max_grad_norm)
    run_start, images_seen = time.time(), 0
    # what the first convolution really produced, logged once: the proof that mixed precision is on (the prepared
    # model's outputs are cast back to fp32, so they cannot tell)
    compute_dtype, conv_dtypes = None, []
    first_conv = next(m for m in model.trained_gens.g_ab.modules() if isinstance(m, torch.nn.Conv2d))
    dtype_hook = first_conv.register_forward_hook(lambda module, inputs, output: conv_dtypes.append(output.dtype) and None)
    epoch = state.step // steps_per_epoch
    last = {}
    status = "finished"

    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        iterators = {}
        for contrast, loader in loaders.items():
            loader.dataset.set_epoch(epoch)
            iterators[contrast] = iter(loader)
        for _ in range(state.step % steps_per_epoch):  # resume mid-epoch: skip to the saved data position
            next(iterators["t1"]), next(iterators["t2"])
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        while state.step < epoch_end:
            batch = {c: next(it) for c, it in iterators.items()}
            for c in batch:
                for slot, count in zip(batch[c]["slot"].tolist(), batch[c]["skipped"].tolist()):
                    skipped_by_slot[(c, slot)] = max(skipped_by_slot.get((c, slot), 0), count)
            if trace:
                trace.write("".join(f"{state.step} {c} {k}\n" for c in batch for k in batch[c]["key"]))
            real_a = batch["t1"]["image"].to(accelerator.device)
            real_b = batch["t2"]["image"].to(accelerator.device)
            if config.channels_last:
                real_a, real_b = real_a.to(memory_format=torch.channels_last), real_b.to(memory_format=torch.channels_last)

            step_losses = train_step(accelerator, model, real_a, real_b, state.step)
            if compute_dtype is None:
                dtype_hook.remove()
                compute_dtype = str(conv_dtypes[0]).removeprefix("torch.")
                accelerator.print(f"mixed precision {config.mixed_precision}: the generators compute in {compute_dtype}")
            if step_losses is None:
                state.nan_steps += 1
                state.bad_in_a_row += 1
                consecutive = state.bad_in_a_row
                accelerator.print(f"warning: step {state.step}: NaN/inf loss, step skipped ({consecutive} in a row, {state.nan_steps} in all)")
                if consecutive >= config.max_bad_steps:
                    last_good = rundir.list_checkpoints(out)
                    where = f"the last good checkpoint is {last_good[-1][1]}" if last_good else "no checkpoint was written yet"
                    bar.close()
                    raise SystemExit(f"error: {consecutive} consecutive steps with NaN/inf losses at step {state.step}; "
                                     f"stopping ({where}). Try a lower --lr or --mixed_precision no.")
                continue
            state.bad_in_a_row = 0
            state.step += 1
            bar.update()
            images = 2 * real_a.shape[0] * world
            window.add(step_losses, images)
            images_seen += images

            if state.step % config.log_every == 0 or state.step == total_steps:
                last = {**window.means(), "lr": model.sched_g.get_last_lr()[0], "lr_d": model.sched_d.get_last_lr()[0],
                        "nan_steps": state.nan_steps, "skipped_samples": sum(skipped_by_slot.values())}
                warnings = discriminators.check(state.step, last) + spikes.check(state.step, last)
                if is_main:
                    for warning in warnings:
                        tqdm.write(warning)
                    metrics_log.write({"step": state.step, "epoch": epoch, **last})
                    bar.set_postfix(G=f"{last['loss/G']:.3f}", D=f"{last['loss/D']:.3f}", ips=f"{last['images_per_s']:.1f}")
                    tqdm.write(f"step {state.step} epoch {epoch}: G {last['loss/G']:.4f} (adv {last['loss/G_adv']:.4f} cycle "
                               f"{last['loss/cycle']:.4f} idt {last['loss/identity']:.4f}) D {last['loss/D']:.4f} "
                               f"{last['images_per_s']:.2f} images/s")
                accelerator.log({**last, "epoch": epoch}, step=state.step)

            at_epoch_end = state.step == epoch_end
            scores = {}
            if (config.val_every and state.step % config.val_every == 0) or at_epoch_end:
                scores = validate(accelerator, model.inference_gens, val, previews, out, epoch, state, config, at_epoch_end)
                if scores and is_main:
                    metrics_log.write({"step": state.step, "epoch": epoch, **scores})
            stop_now = any_rank(accelerator, stop.flag or (is_main and (out / rundir.STOP).exists()))
            if state.step % config.checkpoint_every == 0 or state.step == total_steps or stop_now:
                save_checkpoint(accelerator, [model.gens, model.discs, *([model.nce] if model.nce else [])], model.inference_gens, out, state, epoch,
                                config, last, scores, preprocessing)
            if stop_now:
                status = "stopped"
                if is_main:
                    (out / rundir.STOP).unlink(missing_ok=True)
                accelerator.print(f"stopped at step {state.step}; resume with --resume auto")
                break
        if status == "stopped":
            break

    bar.close()
    if heartbeat:
        heartbeat.stop()
    if trace:
        trace.close()
    if is_main:
        rundir.write_gif(out)
        write_summary(out, state, epoch, status, images_seen / max(time.time() - run_start, 1e-9), skipped_by_slot, total_steps,
                      compute_dtype)
        if accelerator.trackers:
            log_run_end(accelerator.get_tracker("wandb", unwrap=True), out, state, config.wandb_log_checkpoints)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


@torch.no_grad()
def validate(accelerator, model: CycleGenerators, val, previews, out: Path, epoch: int, state: TrainState, config: Config,
             draw: bool) -> dict:
    """Paired val metrics, split across ranks and summed; on the main process, the epoch's prediction grid."""
    if not val:
        return {}
    model.eval()
    names = [rundir.val_name(d, m) for d in rundir.DIRECTIONS for m in rundir.VAL_METRICS] + list(rundir.VAL_CYCLE)
    sums = torch.zeros(len(names) + 1, device=accelerator.device)
    brightness_totals = torch.zeros(len(rundir.DIRECTIONS), 3, device=accelerator.device)  # brightness_sums per direction
    mine = val[accelerator.process_index::accelerator.num_processes]
    for start in range(0, len(mine), 8):
        chunk = mine[start:start + 8]
        t1, t2, mask = (torch.stack([torch.from_numpy(s[k]) for s in chunk])[:, None].to(accelerator.device) for k in ("t1", "t2", "mask"))
        results = translate_both(model, t1, t2, accelerator, config.val_tta)
        values = []
        images = {"t1": t1, "t2": t2}
        for index, (direction, (_, target)) in enumerate(rundir.DIRECTIONS.items()):
            m = slice_metrics(results[direction], images[target], mask)
            values += [m[k] for k in rundir.VAL_METRICS]
            brightness_totals[index] += brightness_sums(m)
        values += [slice_metrics(results["t1_cycle"], t1, mask)["ssim"], slice_metrics(results["t2_cycle"], t2, mask)["ssim"]]
        sums[:-1] += torch.stack([v.sum() for v in values])
        sums[-1] += len(chunk)
    if accelerator.num_processes > 1:
        sums, brightness_totals = (accelerator.reduce(t, reduction="sum") for t in (sums, brightness_totals))
    scores = {name: (sums[i] / sums[-1]).item() for i, name in enumerate(names)}
    for direction, totals in zip(rundir.DIRECTIONS, brightness_totals):
        mean_std = brightness(totals)
        if mean_std["mean"] is not None:
            scores.update({rundir.val_name(direction, name): mean_std[key] for name, key in zip(rundir.VAL_BRIGHTNESS, ("mean", "std"))})
    scores[rundir.VAL_SCORE] = sum(scores[rundir.val_name(d, "ssim_masked")] for d in rundir.DIRECTIONS) / len(rundir.DIRECTIONS)
    scores["val/slices"] = int(sums[-1].item())
    if accelerator.is_main_process:
        if draw and previews:
            t1, t2 = (torch.stack([torch.from_numpy(s[k]) for s in previews])[:, None].to(accelerator.device) for k in ("t1", "t2"))
            r = translate_both(model, t1, t2, accelerator, config.val_tta)
            columns = {"t1_to_t2": (t1, r["t1_to_t2"], r["t1_cycle"], t2), "t2_to_t1": (t2, r["t2_to_t1"], r["t2_cycle"], t1)}
            rows = [[x[i, 0].float().cpu().numpy() for x in columns[d]] for i in range(len(previews)) for d in rundir.PREDICTION_ROWS]
            rundir.save_prediction(out, epoch, rundir.prediction_grid(rows))
            rundir.write_gif(out)
            if accelerator.trackers:
                captions = [f"{s['key']} {rundir.LABELS[d]}: {' | '.join(rundir.PREDICTION_COLUMNS)}"
                            for s in previews for d in rundir.PREDICTION_ROWS]
                accelerator.log({"predictions": tracking.slice_images(rows, captions)}, step=state.step)
        accelerator.log({**scores, "epoch": epoch}, step=state.step)
    model.train()
    return scores


def translate_both(model: CycleGenerators, t1: torch.Tensor, t2: torch.Tensor, accelerator, tta: bool) -> dict[str, torch.Tensor]:
    """[0,1] inputs -> [0,1] translations and cycle reconstructions in both directions. With `tta` the
    translations are the mean of flipped and shifted copies; the way back stays one pass (a tenth of the cost)."""
    g_ab, g_ba = (Translator([net], tta) for net in (model.g_ab, model.g_ba))
    with accelerator.autocast():
        fake_t2, fake_t1 = g_ab(to_model_range(t1)), g_ba(to_model_range(t2))
        cycle_t1, cycle_t2 = model.g_ba(fake_t2), model.g_ab(fake_t1)
    return {k: from_model_range(v) for k, v in
            (("t1_to_t2", fake_t2), ("t2_to_t1", fake_t1), ("t1_cycle", cycle_t1), ("t2_cycle", cycle_t2))}


def log_run_end(run, out: Path, state: TrainState, log_checkpoint: bool) -> None:
    """The training GIF as a video and, with --wandb_log_checkpoints, the best checkpoint's generators as an artifact."""
    if (out / rundir.GIF).is_file():
        run.log({"progress": tracking.video(out / rundir.GIF)}, step=state.step)
    checkpoints = dict(rundir.list_checkpoints(out))
    if log_checkpoint and checkpoints:
        step = state.best_step if state.best_step in checkpoints else max(checkpoints)
        aliases = [f"step-{step}", *(["best"] if step == state.best_step else [])]
        tracking.log_checkpoint(run, checkpoints[step], [*rundir.GENERATORS.values(), rundir.CHECKPOINT_INFO], aliases)


def write_summary(out: Path, state: TrainState, epoch: int, status: str, images_per_s: float, skipped: dict, total_steps: int,
                  compute_dtype: str | None) -> None:
    rows = rundir.read_metrics(out)
    vals = [r for r in rows if rundir.VAL_SCORE in r]
    best = max(vals, key=lambda r: r[rundir.VAL_SCORE]) if vals else None
    rundir.write_json(out / rundir.SUMMARY, {
        "status": status, "steps": state.step, "total_steps": total_steps, "epochs": epoch + 1,
        "images_per_s": images_per_s, "compute_dtype": compute_dtype, "nan_steps": state.nan_steps, "skipped_samples": sum(skipped.values()),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "best": best, "last": vals[-1] if vals else None, "best_checkpoint_step": state.best_step,
        "last_train": next((r for r in reversed(rows) if "loss/G" in r), None)})


def run() -> None:
    """The command: main(); an error exit marks the W&B run failed, and every exit tears the process group down
    (left to the interpreter's teardown, gloo's worker threads can abort the process: SIGABRT, pytorch/pytorch#179291).
    A finished process of a multi-process run then leaves without that teardown at all: even with its group destroyed,
    gloo aborted it there ("terminate called without an active exception", no Python frame) in 3 of 40 two-process
    runs on a busy 2-core CPU. What the run wrote is closed by then, and its W&B run finished."""
    try:
        code = main()
    except SystemExit as err:
        tracking.finish_failed(err.code)
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
