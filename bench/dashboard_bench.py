"""Dashboard speed: the run list for many runs, and translating one slice on demand.

    python bench/dashboard_bench.py [--runs 50] [--rows 1000] [--size 256]

Writes `--runs` synthetic run folders (config, `--rows` logged steps with a validation every 10, summary) in
the run-folder format, times what the Runs page reads (dashboard.runs.list_runs) and one run's full metrics
table, then times one `--size`² slice through a U-Net (ngf 64) and back, as the Translate page does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas  # noqa: F401  (imported here so its import time is not counted as reading)
import torch
import yaml

from dashboard.runs import list_runs, metrics_table
from train import rundir
from train.inference import translate
from train.networks import build_generator


def fake_run(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    (folder / rundir.CONFIG).write_text(yaml.safe_dump({"size": 256, "generator": "unet", "ngf": 64, "lr": 2e-4}))
    with open(folder / rundir.METRICS, "w") as f:
        for step in range(1, rows + 1):
            f.write(json.dumps({"step": step * 10, "epoch": step // 100, "loss/G": 3.0, "loss/D": 0.5, "loss/cycle": 1.0,
                                "loss/identity": 0.5, "lr": 2e-4, "images_per_s": 10.0}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step * 10, "epoch": step // 100, "val/ssim_masked_mean": 0.8,
                                    "val/t1_to_t2/ssim_masked": 0.8, "val/t2_to_t1/ssim_masked": 0.8}) + "\n")
    rundir.write_json(folder / rundir.SUMMARY, {"status": "finished", "steps": rows * 10, "total_steps": rows * 10,
                                                "best": {"step": rows * 10, "val/ssim_masked_mean": 0.8}, "last": None})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.runs):
            fake_run(root / f"run-{i:03d}", args.rows)
        start = time.perf_counter()
        runs = list_runs(root)
        listed = time.perf_counter() - start
        start = time.perf_counter()
        table = metrics_table(runs[0].path)
        one = time.perf_counter() - start
    print(f"run list: {len(runs)} runs of {args.rows} logged steps in {listed:.3f} s")
    print(f"one run's metrics table ({len(table)} rows): {one:.3f} s")

    g_ab, g_ba = build_generator("unet", args.size, 64).eval(), build_generator("unet", args.size, 64).eval()
    image = torch.rand(1, 1, args.size, args.size)
    translate(g_ba, translate(g_ab, image))  # warm up
    start = time.perf_counter()
    for _ in range(5):
        translated = translate(g_ab, image)
    one_way = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    for _ in range(5):
        translate(g_ba, translated)
    print(f"translate one {args.size}^2 slice: {one_way:.2f} s; with the cycle reconstruction the page also shows: "
          f"{one_way + (time.perf_counter() - start) / 5:.2f} s")


if __name__ == "__main__":
    main()
