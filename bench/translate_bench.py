"""Volume translation speed and peak memory: one IXI-size T1 (256x256x150) through `python -m train.translate`.

    python bench/translate_bench.py [--size 256] [--ngf 64] [--batch-size 8]

Speed does not depend on what the weights learned, so the checkpoint is a freshly initialized U-Net written
in the run-folder format (train/rundir.py). Prints seconds per volume, translated slices/s and the peak RSS
of the translate process.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from shards.preprocess import axial_grid, foreground, load_nifti, resample
from shards.synth import render_subject, subjects
from train import rundir
from train.networks import build_generator


def fake_checkpoint(folder: Path, size: int, ngf: int) -> Path:
    checkpoint = rundir.checkpoint_dir(folder, 0)
    checkpoint.mkdir(parents=True)
    for name in rundir.GENERATORS.values():
        save_file(build_generator("unet", size, ngf).state_dict(), str(checkpoint / name))
    rundir.write_json(checkpoint / rundir.CHECKPOINT_INFO, {
        "step": 0, "generator": {"arch": "unet", "size": size, "ngf": ngf, "input_range": [-1, 1]},
        "preprocessing": {"size": size, "fov_mm": 256.0}})
    return checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject = next(s for s in subjects(4, seed=0) if "T1" in s.contrasts)
        volume = tmp / subject.filename("T1")
        volume.write_bytes(render_subject(subject, seed=0, downsample=1)["T1"])
        data, affine, _ = load_nifti(volume.read_bytes())
        grid = axial_grid(data, affine, args.size, 256.0)
        planes = int(foreground(resample(data, affine, grid)).any(axis=(0, 1)).sum())
        checkpoint = fake_checkpoint(tmp / "run", args.size, args.ngf)

        start = time.time()
        subprocess.run([sys.executable, "-m", "train.translate", "--checkpoint", str(checkpoint), "--direction", "t1-to-t2",
                        "--input", str(volume), "--output", str(tmp / "out"), "--batch-size", str(args.batch_size)], check=True)
        seconds = time.time() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"volume {data.shape} -> axial grid {grid.shape}, {planes} slices with head translated at {args.size}^2 (U-Net ngf {args.ngf})")
    print(f"translate: {seconds:.1f} s per volume (process start and model load included) = {planes / seconds:.1f} slices/s; "
          f"peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
