"""The GPU check: does the trainer really train on this GPU, in every precision, and how fast. One command,
under 8 minutes on one GPU; `--cpu` is a smoke run of the same checks that CI runs on every change.

    python bench/gpu_check.py [--out bench-out/gpu-check] [--data SHARDS]      # on a GPU machine
    python bench/gpu_check.py --cpu [--data SHARDS]                            # the CI smoke run

1. Precision: `accelerate launch --mixed_precision P train/main.py` for P in no, bf16, fp16 (bf16 only with --cpu):
   the losses are finite, a checkpoint is written, the first convolution computed in the precision asked for
   (summary.json `compute_dtype`), and a run stopped halfway and resumed ends with the same generator weights
   as the uninterrupted run (with --deterministic).
2. Throughput: the trainer's images/s over the second half of its steps, and peak GPU memory, at 256² (--cpu: 64²,
   ngf/ndf 8, fp32, batch 2) for batch sizes 1 to 32, with and without torch.compile (`--dynamo_backend inductor`).
3. Data: slices/s that one DataLoader worker delivers, beside what the GPU consumes, and so how many workers
   a GPU needs.

Without --data it synthesizes and packs 6 subjects at the check's size. Prints one table per part and writes
OUT/results.json. docs/benchmarks.md has the figures of each GPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from safetensors.torch import load_file

from train import rundir
from train.config import Config
from train.data import train_loaders

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def launch(data: Path, out: Path, precision: str, steps: int, batch: int, *extra, dynamo: str = "no") -> dict:
    """One `accelerate launch` of the trainer; its summary.json, or an error with the log's tail."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", dynamo, "train/main.py", "--data", str(data), "--out", str(out),
               "--max_steps", str(steps), "--batch_size", str(batch), "--report_to", "none", "--num_workers", "2",
               "--log_every", str(max(steps // 2, 1)), "--val_every", str(steps), "--val_max_slices", "16", *map(str, extra)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed ({done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
    return rundir.read_summary(out)


def generators(run: Path, step: int) -> dict:
    return {name: load_file(str(rundir.checkpoint_dir(run, step) / file)) for name, file in rundir.GENERATORS.items()}


def check_precision(data: Path, out: Path, precision: str, steps: int, widths: list[str]) -> dict:
    # a limit that binds at every step: under fp16 the gradients must be unscaled before their norm is taken and
    # clipped; deterministic kernels, without which two uninterrupted runs on a GPU already differ
    options = [*widths, "--max_grad_norm", "1", "--deterministic"]
    whole = launch(data, out / f"{precision}-whole", precision, steps, 2, "--checkpoint_every", steps // 2, *options)
    losses = whole["last_train"]
    assert all(math.isfinite(v) for k, v in losses.items() if k.startswith("loss/")), f"{precision}: losses not finite: {losses}"
    assert whole["compute_dtype"] == DTYPES[precision], f"{precision}: the generators computed in {whole['compute_dtype']}"
    resumed = out / f"{precision}-resumed"  # from the whole run's halfway checkpoint, as after a crash there
    launch(data, resumed, precision, steps, 2, "--checkpoint_every", steps // 2, *options,
           "--resume", rundir.checkpoint_dir(out / f"{precision}-whole", steps // 2))
    a, b = generators(out / f"{precision}-whole", steps), generators(resumed, steps)
    exact = all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    return {"precision": precision, "compute_dtype": whole["compute_dtype"], "loss_G": losses["loss/G"],
            "grad_norm_G": losses["grad_norm/G"], "resume_exact": exact}


def contrast_loader(data: Path, batch: int, augment: bool) -> DataLoader:
    """The trainer's T1 loader on one worker: decoding, and with `augment` its augmentation from the first step
    (what a run that augments needs from its workers)."""
    config = Config(data=str(data), out="-", batch_size=batch, num_workers=1, augment=augment, augment_start=0)
    return train_loaders(config, 0, 1, steps_per_epoch=1, total_steps=1)["t1"]


def loader_rate(loader: DataLoader, seconds: float = 10.0) -> float:
    """Slices per second that `loader` delivers after its first batch (the worker's start-up is not its rate)."""
    count, start = 0, None
    for batch_images in loader:
        if start is None:
            start = time.perf_counter()
            continue
        count += len(batch_images["image"])
        if time.perf_counter() - start > seconds:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the smoke run: 64², narrow networks, few steps; bf16 only (fp32 is the "
                        "unit tests'), one fp32 throughput run at batch 2, no fp16, no compile")
    parser.add_argument("--data", type=Path, help="shards to train on (default: 6 synthetic subjects, packed at the check's size)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "gpu-check")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("error: no GPU is visible; run with --cpu for the smoke run")
    size, steps, batches = (64, 4, [2]) if args.cpu else (256, 40, [1, 2, 4, 8, 16, 32])
    precisions = ["bf16"] if args.cpu else ["no", "bf16", "fp16"]
    # the smoke run checks the code path at narrow widths: bf16 on a CPU without bf16 units is emulated, 11 s a
    # step at the default widths and 64² on 2 cores
    widths = ["--ngf", "8", "--ndf", "8"] if args.cpu else []
    # torch.compile at a few batch sizes: each compiles for a minute, and the check must stay under 8 minutes
    settings = [("no", b) for b in batches] + ([] if args.cpu else [("inductor", b) for b in (1, 8, 32)])
    out = args.out.resolve()
    for stale in ("precision", "throughput"):  # runs of an earlier check: a fresh run refuses a folder with checkpoints
        shutil.rmtree(out / stale, ignore_errors=True)
    data = args.data
    if data is None:
        data = out / f"shards-{size}"
        if not (data / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "shards", "synth", "--out", out / "ixi", "--subjects", "6", "--seed", "0",
                            "--downsample", str(256 // size)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            subprocess.run([sys.executable, "-m", "shards", "pack", "--t1", out / "ixi" / "IXI-T1.tar", "--t2", out / "ixi" / "IXI-T2.tar",
                            "--out", data, "--size", str(size), "--register", "none"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; shards {data}")

    results = {"device": device, "torch": torch.__version__, "size": size, "precision": [], "throughput": []}
    for precision in precisions:
        results["precision"].append(check_precision(data, out / "precision", precision, steps, widths))
    print("\n| precision | computes in | G loss | G gradient norm (before clipping) | resume exact |\n|---|---|---|---|---|")
    for r in results["precision"]:
        print(f"| {r['precision']} | {r['compute_dtype']} | {r['loss_G']:.3f} | {r['grad_norm_G']:.3g} | {r['resume_exact']} |")
    # fp16's loss scale is 65536 at first: a norm taken before unscaling would be thousands of times fp32's
    norms = {r["precision"]: r["grad_norm_G"] for r in results["precision"]}
    assert "fp16" not in norms or norms["fp16"] < 10 * norms["no"], f"fp16 gradient norm {norms['fp16']:.3g} vs fp32 {norms['no']:.3g}"

    best = "no" if args.cpu else "bf16"
    for dynamo, batch in settings:
        summary = launch(data, out / "throughput" / f"{dynamo}-b{batch}", best, steps, batch, "--checkpoint_every", steps * 10, *widths,
                         dynamo=dynamo)
        # the rate is the second half's, the last logged window: the whole run's includes start-up, cuDNN's
        # autotuning and compilation
        results["throughput"].append({"compile": dynamo, "batch": batch, "images_per_s": summary["last_train"]["images_per_s"],
                                      "whole_run_images_per_s": summary["images_per_s"],
                                      "peak_gpu_memory_gib": summary["peak_gpu_memory_gib"]})
    print(f"\n| torch.compile | batch | images/s at {size}² ({best}), steps {steps // 2 + 1}-{steps} | the whole run, start-up "
          f"and compilation included | peak GPU memory (GiB) |\n|---|---|---|---|---|")
    for r in results["throughput"]:
        memory = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
        print(f"| {r['compile']} | {r['batch']} | {r['images_per_s']:.1f} | {r['whole_run_images_per_s']:.1f} | {memory} |")

    consumed = max(r["images_per_s"] for r in results["throughput"])
    results["data"] = {"consumed_images_per_s": consumed}
    print()
    # each step reads one T1 and one T2 slice per image, from two loaders
    for augment in (False, True):
        per_worker = loader_rate(contrast_loader(data, max(batches), augment), 3.0 if args.cpu else 10.0)
        workers = math.ceil(consumed / per_worker) if per_worker else None
        results["data"]["augmented" if augment else "plain"] = {"slices_per_s_per_worker": per_worker, "workers_per_contrast": workers}
        print(f"one loader worker{' augmenting' if augment else ''}: {per_worker:.0f} slices/s; the fastest setting consumes "
              f"{consumed:.0f} images/s per contrast: about {workers} worker(s) per contrast (--num_workers)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    failed = [r["precision"] for r in results["precision"] if not r["resume_exact"]]
    if failed:
        raise SystemExit(f"error: resume was not exact in {', '.join(failed)}")


if __name__ == "__main__":
    main()
