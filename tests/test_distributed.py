"""Two CPU processes (gloo) under `accelerate launch --config_file accelerate_config.yaml`: replicas stay identical, ranks read
disjoint data, the run folder is written once, and the logged val metrics are the all-rank result."""

from __future__ import annotations

import json
import os
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


FAILING_WRITE = """
import dataclasses, errno, sys
from pathlib import Path
from accelerate import Accelerator
from train import checkpoints
from train.config import load_config
from train.step import build_cycle_gan

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)  # the trainer's choice on a node without GPUs: gloo
config = load_config(["--data", "unused", "--out", str(out), "--ngf", "4", "--ndf", "4"])
model = build_cycle_gan(accelerator, dataclasses.replace(config, size=32), total_steps=1)
if accelerator.is_main_process:  # rank 0 finds the disk full when it writes the generators
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoints.save_file = full
try:
    checkpoints.save_checkpoint(accelerator, [model.gens], model.inference_gens, out, checkpoints.TrainState(step=3), 0, config,
                                {}, {}, {})
except SystemExit as err:
    print(f"rank {accelerator.process_index}: {err}", flush=True)
"""


def test_a_checkpoint_write_that_fails_on_one_rank_stops_every_rank_with_the_error(tmp_path):
    """Rank 0's write fails after the other rank's part is done: both get the error, none waits in a collective
    for a rank that gave up (each catches it here and exits cleanly, so a rank left waiting would fail the run)."""
    script = tmp_path / "failing_write.py"
    script.write_text(FAILING_WRITE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "29518", str(script), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: error: cannot write the step-3 checkpoint" in result.stdout and "no space left on device" in result.stdout
    assert not list((out / rundir.CHECKPOINTS).iterdir()), "the partial checkpoint is removed"
