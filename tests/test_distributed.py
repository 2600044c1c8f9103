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
from train import main as train_main
from train import rundir
from train.data import val_samples
from train.inference import load_generator, translate
from train.metrics import brightness, brightness_sums, slice_metrics

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
    """Generators, discriminators and PatchNCE heads: the checksum covers every weight the optimizers train."""
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
    assert "terminate called" not in log, "a finished rank leaves without the interpreter's teardown, where gloo can abort it"
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
        whole = brightness(brightness_sums(scores))  # summed over both ranks' halves, it is the brightness of all
        assert (logged[f"val/{direction}/brightness"], logged[f"val/{direction}/brightness_std"]) == pytest.approx(
            (whole["mean"], whole["std"]), abs=1e-4), direction


FAILING_WRITE = """
import errno, os
from train import checkpoints, main

if os.environ["RANK"] == "0":  # rank 0 finds the disk full when it writes the generators
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoints.save_file = full
try:
    main.run()
except SystemExit as err:  # each rank lives on to print its error: one that exits first would have the launcher stop the other
    print(f"rank {os.environ['RANK']}: {err}", flush=True)
"""


@pytest.mark.parametrize("fails", ["generators", "folder"])
def test_a_checkpoint_write_that_fails_on_one_rank_stops_every_rank_with_the_error(fails, shards_dir, tmp_path):
    """Rank 0's write fails, after the other rank's part is done (the generators, which rank 0 alone writes) or before
    any (the temporary folder, which rank 0 alone makes): the trainer stops both with the error, none waits in a
    collective for a rank that gave up, and none aborts (SIGABRT) on the way out, as gloo's threads may when the
    process group is left to the interpreter's teardown (CI saw it once)."""
    script = tmp_path / "failing_write.py"
    script.write_text(FAILING_WRITE if fails == "generators" else FAILING_WRITE.replace("checkpoints.save_file = full", "pass"))
    out = tmp_path / "run"
    if fails == "folder":  # a file where the checkpoints folder goes: rank 0 cannot make the step's folder in it
        out.mkdir()
        (out / rundir.CHECKPOINTS).write_text("")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "29518", str(script), "--data", str(shards_dir), "--out", str(out), *SMALL,
           "--max_steps", "3", "--steps_per_epoch", "3", "--checkpoint_every", "3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "terminate called" not in log, log[-3000:]
    rank0 = "no space left on device" if fails == "generators" else "NotADirectoryError"
    for rank, cause in ((0, rank0), (1, "OSError: another process could not write its part")):
        assert f"rank {rank}: error: cannot write the step-3 checkpoint into {out} ({cause}" in result.stdout, log[-3000:]
    assert result.stdout.count("no partial checkpoint is left behind. No checkpoint was written yet.") == 2, log[-3000:]
    if fails == "generators":
        assert not list((out / rundir.CHECKPOINTS).iterdir()), "the partial checkpoint is removed"


def test_the_command_tears_the_process_group_down_when_it_fails(tmp_path, monkeypatch):
    """What keeps the test above from aborting, checked in one process: run() destroys the group on an error exit."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(sys, "argv", ["train/main.py", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
        with pytest.raises(SystemExit, match="error: "):
            train_main.run()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
