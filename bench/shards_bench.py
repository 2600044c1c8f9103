"""Packing throughput, peak memory and read-back speed on IXI-size volumes.

    python bench/shards_bench.py [--subjects 8] [--workers 2] [--size 256]

Synthesizes IXI-size (256x256x150 T1, 256x256x130 T2) subjects, packs them, and prints volumes/s, the peak
RSS of the whole process tree while packing, and decoded slices/s when reading the shards back on one core.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import webdataset as wds

from shards.format import decode_sample, shard_paths
from shards.pack import PackOptions, pack
from shards.synth import synthesize


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data", help="existing folder with IXI-T1.tar and IXI-T2.tar (default: synthesize)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or Path(tmp) / "ixi")
        if not args.data:
            start = time.time()
            synthesize(data, args.subjects, seed=0, workers=args.workers)
            print(f"synth: {args.subjects} subjects in {time.time() - start:.1f}s")
        peak, stop = [0], threading.Event()

        def watch():
            me = psutil.Process()
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(me))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.time()
        manifest = pack(data / "IXI-T1.tar", data / "IXI-T2.tar", Path(tmp) / "shards",
                        PackOptions(size=args.size), workers=args.workers, progress=False)
        seconds = time.time() - start
        stop.set()
        watcher.join()
        volumes = len(manifest["files"])
        slices = sum(n for split in manifest["splits"].values() for n in split["slices"].values())
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        print(f"pack: {volumes} volumes, {slices} slices at {args.size}^2 in {seconds:.1f}s = {volumes / seconds:.2f} volumes/s "
              f"with {args.workers} workers")
        print(f"pack: peak RSS of the process tree {peak[0] / 2**30:.2f} GiB")
        torch_threads = os.environ.get("OMP_NUM_THREADS")
        paths = shard_paths(Path(tmp) / "shards", "train", "t1")
        start = time.time()
        count = sum(1 for s in wds.WebDataset(paths, shardshuffle=False) if decode_sample(s)["t1"] is not None)
        seconds = time.time() - start
        print(f"read-back: {count} slices decoded in {seconds:.2f}s = {count / seconds:.0f} slices/s on one core (OMP_NUM_THREADS={torch_threads})")


if __name__ == "__main__":
    main()
