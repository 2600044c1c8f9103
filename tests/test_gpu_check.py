"""bench/gpu_check.py, the one-command GPU check, in its --cpu smoke mode: so that it runs when a GPU is at hand."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import torch
from conftest import ROOT

from shards.format import decode_png16, shard_paths
from train.data import read_whole
from train.networks import to_model_range


def test_the_gpu_check_smoke_run_checks_precision_resume_throughput_and_loaders(shards_dir, tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--data", shards_dir, "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["precision"], r["compute_dtype"], r["resume_exact"]) for r in results["precision"]] == [("bf16", "bfloat16", True)]
    assert results["precision"][0]["grad_norm_G"] > 0  # the clipped run reports its norms
    assert [(r["compile"], r["batch"]) for r in results["throughput"]] == [("no", 2)]
    # the steady rate of the second half is its own figure beside the whole run's (not compared: a timed test flakes)
    assert all(r["images_per_s"] > 0 and r["whole_run_images_per_s"] > 0 and r["images_per_s"] != r["whole_run_images_per_s"]
               for r in results["throughput"])
    plain, augmented = results["data"]["plain"], results["data"]["augmented"]
    assert all(r["slices_per_s_per_worker"] > 0 and r["workers_per_contrast"] >= 1 for r in (plain, augmented))
    assert "| bf16 | bfloat16 |" in done.stdout and "one loader worker augmenting:" in done.stdout


def test_the_loader_rates_are_of_a_plain_and_an_augmenting_loader(shards_dir, monkeypatch):
    """The plain rate's loader delivers the shards' own slices, and the augmenting one reshapes them (an earlier
    check built a default Config and called a loader that augmented every slice "plain")."""
    monkeypatch.syspath_prepend(ROOT / "bench")
    gpu_check = importlib.import_module("gpu_check")
    stored = {s["__key__"]: to_model_range(torch.from_numpy(decode_png16(s["t1.png"]))[None])
              for s in read_whole(shard_paths(shards_dir, "train", "t1"))}
    for augment in (False, True):
        batch = next(iter(gpu_check.contrast_loader(shards_dir, 4, augment)))
        same = [torch.equal(image, stored[key]) for image, key in zip(batch["image"], batch["key"], strict=True)]
        assert same == [not augment] * 4, (augment, same)
