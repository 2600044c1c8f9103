"""Packing throughput, peak memory and read-back speed on IXI-size volumes, and what registration and N4 cost.

    python bench/shards_bench.py [--subjects 8] [--workers 2] [--size 256] [--motion 10,10] [--packs none rigid n4]

Synthesizes IXI-size (256x256x150 T1, 256x256x130 T2) subjects whose heads move between T1 and T2, packs them
three times (--register none; the default --register rigid; rigid with --bias-correction n4) and prints, for
each, volumes/s and the peak RSS of the whole process tree while packing; then the extra seconds per registered
subject and per N4-corrected volume (of one worker), and decoded slices/s when reading the shards back on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import webdataset as wds

from shards.format import decode_sample, shard_paths
from shards.pack import PackOptions, pack
from shards.preprocess import foreground, load_nifti
from shards.register import apply
from shards.synth import MOTION_FILE, synthesize


# the packs it can time: their label and the PackOptions beside --size
PACKS = {"none": ("register none", {"register": "none"}), "rigid": ("register rigid (default)", {}),
         "n4": ("register rigid + n4", {"bias_correction": "n4"})}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def residuals(data: Path, registered: dict) -> dict[str, tuple[float, float]]:
    """Per registered subject: the largest true motion and the largest residual after registration over its head (mm)."""
    truth = json.loads((data / MOTION_FILE).read_text())["subjects"]
    out = {}
    with tarfile.open(data / "IXI-T1.tar") as tar:
        for member in tar.getmembers():
            subject = member.name.split("-")[0]
            if subject in registered:
                volume, affine, _ = load_nifti(tar.extractfile(member).read())
                head = np.argwhere(foreground(volume)[::2, ::2, ::2]) * 2 @ affine[:3, :3].T + affine[:3, 3]
                motion, found = np.array(truth[subject]), np.array(registered[subject]["transform_ras"])
                out[subject] = (float(np.linalg.norm(apply(motion, head) - head, axis=1).max()),
                                float(np.linalg.norm(apply(found, head) - apply(motion, head), axis=1).max()))
    return out


def timed_pack(data: Path, out: Path, options: PackOptions, workers: int) -> tuple[float, int, dict]:
    """Seconds, peak RSS of the process tree (bytes) and the manifest of one pack."""
    peak, stop = [0], threading.Event()

    def watch():
        me = psutil.Process()
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(me))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.time()
    manifest = pack(data / "IXI-T1.tar", data / "IXI-T2.tar", out, options, workers=workers, progress=False)
    seconds = time.time() - start
    stop.set()
    watcher.join()
    return seconds, peak[0], manifest


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--motion", default="10,10", help="synth --motion DEG,MM for the synthesized subjects")
    parser.add_argument("--data", help="existing folder with IXI-T1.tar and IXI-T2.tar (default: synthesize)")
    parser.add_argument("--packs", nargs="+", choices=PACKS, default=list(PACKS), help="which packs to time (the costs of "
                        "registration and N4 are printed when their pack and the one without are both timed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or Path(tmp) / "ixi")
        if not args.data:
            start = time.time()
            synthesize(data, args.subjects, seed=0, workers=args.workers, motion=tuple(float(v) for v in args.motion.split(",")))
            print(f"synth: {args.subjects} subjects in {time.time() - start:.1f}s")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        timings, manifests = {}, {}
        for pack_name in args.packs:
            name, options = PACKS[pack_name]
            seconds, peak, manifest = timed_pack(data, Path(tmp) / pack_name, PackOptions(size=args.size, **options), args.workers)
            timings[pack_name], manifests[pack_name] = seconds, manifest
            volumes = len(manifest["files"])
            slices = sum(n for split in manifest["splits"].values() for n in split["slices"].values())
            print(f"pack, {name}: {volumes} volumes, {slices} slices at {args.size}^2 in {seconds:.1f}s = {volumes / seconds:.2f} "
                  f"volumes/s with {args.workers} workers; peak RSS of the process tree {peak / 2**30:.2f} GiB")
        registered = manifests["rigid"]["registration"]["subjects"] if "rigid" in manifests else {}
        if {"none", "rigid"} <= timings.keys():
            extra = (timings["rigid"] - timings["none"]) * args.workers / max(1, len(registered))
            print(f"registration: {len(registered)} paired subjects, about {extra:.1f} s more each (one worker)")
        if registered and (data / MOTION_FILE).exists():
            for subject, residual in residuals(data, registered).items():
                print(f"registration: {subject}: true motion up to {residual[0]:.1f} mm over the head, residual after "
                      f"registration up to {residual[1]:.2f} mm")
        if {"rigid", "n4"} <= timings.keys():
            n4 = (timings["n4"] - timings["rigid"]) * args.workers / volumes
            print(f"n4: about {n4:.1f} s more per volume (one worker)")
        shards = Path(tmp) / args.packs[-1]
        torch_threads = os.environ.get("OMP_NUM_THREADS")
        paths = shard_paths(shards, "train", "t1")
        start = time.time()
        count = sum(1 for s in wds.WebDataset(paths, shardshuffle=False) if decode_sample(s)["t1"] is not None)
        seconds = time.time() - start
        print(f"read-back: {count} slices decoded in {seconds:.2f}s = {count / seconds:.0f} slices/s on one core (OMP_NUM_THREADS={torch_threads})")


if __name__ == "__main__":
    main()
