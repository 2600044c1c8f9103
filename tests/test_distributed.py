"""Two CPU processes (gloo) under `accelerate launch --config_file accelerate_config.yaml`: replicas stay identical, ranks read
disjoint data, the run folder is written once, and the logged val metrics are the all-rank result."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT
from conftest import SMALL
from train import rundir
from train.data import val_samples
from train.inference import load_generator, translate
from train.metrics import slice_metrics

STEPS = 10


@pytest.fixture(scope="module")
def ddp_run(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    # the project's accelerate_config.yaml (all GPUs, bf16), told to start 2 processes in fp32: gloo on this CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "29517",
           "train/main.py", "--data", str(shards_dir), "--out", str(out), *SMALL, "--max_steps", str(STEPS),
           "--steps_per_epoch", str(STEPS), "--checkpoint_every", str(STEPS), "--trace_keys", "true",
           "--lambda_nce", "1"]  # PatchNCE's heads are a third DDP model
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_replicas_stay_identical(ddp_run):
    """Generators and PatchNCE heads: the checksum covers every weight the generator optimizer trains."""
    out, _ = ddp_run
    info = json.loads((rundir.checkpoint_dir(out, STEPS) / rundir.CHECKPOINT_INFO).read_text())
    assert len(info["rank_checksums"]) == 2 and info["rank_checksums"][0] == info["rank_checksums"][1]


def test_each_rank_reads_different_samples(ddp_run):
    out, _ = ddp_run
    seen = []
    for rank in range(2):
        rows = [line.split() for line in rundir.trace_path(out, rank).read_text().splitlines()]
        assert {int(step) for step, _, _ in rows} == set(range(STEPS))
        assert Counter(contrast for _, contrast, _ in rows) == {"t1": STEPS * 2, "t2": STEPS * 2}  # batch 2 per contrast
        seen.append({(contrast, key) for _, contrast, key in rows})
    assert not seen[0] & seen[1]


def test_the_run_folder_is_written_once(ddp_run):
    out, log = ddp_run
    rows = rundir.read_metrics(out)
    train_steps = [r["step"] for r in rows if "loss/G" in r]
    assert train_steps == [5, 10], "one row per logged step, not one per rank"
    assert len([r for r in rows if "val/ssim_masked_mean" in r]) == 1
    assert [s for s, _ in rundir.list_checkpoints(out)] == [STEPS]
    assert [e for e, _ in rundir.list_predictions(out)] == [0]
    assert json.loads((out / rundir.SUMMARY).read_text())["steps"] == STEPS
    assert log.count("step 10 epoch 0: G") == 1, "the progress line comes from the main process only"
    assert not list(out.rglob("*.tmp"))


def test_logged_val_metrics_are_the_all_rank_result(ddp_run, shards_dir):
    """Each rank scores half the val slices; the logged mean must equal scoring all of them on one process."""
    out, _ = ddp_run
    logged = next(r for r in rundir.read_metrics(out) if "val/ssim_masked_mean" in r)
    val = val_samples(shards_dir, "val", 256)
    assert logged["val/slices"] == len(val)
    t1, t2, mask = (torch.stack([torch.from_numpy(s[k]) for s in val])[:, None] for k in ("t1", "t2", "mask"))
    checkpoint = rundir.checkpoint_dir(out, STEPS)
    for direction, source, target in (("t1_to_t2", t1, t2), ("t2_to_t1", t2, t1)):
        net, _ = load_generator(checkpoint, direction)
        scores = slice_metrics(translate(net, source), target, mask)
        for name in ("ssim_masked", "psnr_masked"):
            assert scores[name].mean().item() == pytest.approx(logged[f"val/{direction}/{name}"], abs=1e-4), (direction, name)
