"""W&B, read back from the offline run files the trainer and train.evaluate write: the resolved config, `epoch`,
summaries that keep the best validation score, captioned slice images, the GIF as a video, the checkpoint
artifact, one W&B run across a resume, a new one for a fresh start in a used folder, and the evaluation report
in the run that made the checkpoint."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

from conftest import SMALL, run_module, train
from train import rundir, tracking
from train.config import Config

BLOCK, HEADER, FULL, LAST = 32768, 7, 1, 4  # the .wandb file: a LevelDB log of protobuf records after a 7-byte header


def records(path: Path):
    data, pos, pending = path.read_bytes(), HEADER, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if left < 7 or (length, kind) == (0, 0):  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_runs(run: Path, count: int) -> list[dict]:
    """The `count` offline W&B runs in a run folder, oldest first: id, config, history rows, final summary,
    artifacts. W&B's service process writes a run's file on its own time, so on a loaded machine the last run
    can be short of records for a moment after its process has exited: wait for each file's exit record."""
    for _ in range(120):  # 60 s
        found = [parse_run(path) for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb"))]
        if len(found) == count and all(parsed["exited"] for parsed in found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"not {count} finished W&B runs in {run}: {len(found)}, exited {[parsed['exited'] for parsed in found]}")


def parse_run(path: Path) -> dict:
    parsed = {"id": None, "config": {}, "history": [], "summary": {}, "artifacts": [], "exited": False}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            parsed["id"] = record.run.run_id
        elif kind == "config":
            parsed["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            parsed["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            parsed["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            parsed["artifacts"].append((record.artifact.type, set(record.artifact.aliases)))
        elif kind == "exit":
            parsed["exited"] = True
    return parsed


def test_wandb_mode_follows_report_to_then_the_flag_then_wandb_mode_then_the_login(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.wandb_mode("wandb", "") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert tracking.wandb_mode("wandb", "") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode("wandb", "") == "disabled"
    assert tracking.wandb_mode("wandb", "offline") == "offline"
    assert tracking.wandb_mode("none", "online") == "disabled"
    assert Config(data="d", out="o").report_to == "wandb", "on by default, as in the diffusers examples"


def test_an_offline_run_holds_what_a_wandb_user_looks_for(shards_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    args = ["--data", shards_dir, "--out", run, *SMALL, "--report_to", "wandb", "--log_every", 2, "--val_every", 2]
    train(*args, "--max_steps", 4, "--checkpoint_every", 4, "--wandb_log_checkpoints")
    [first] = offline_runs(run, 1)
    config = first["config"]
    assert (config["size"], config["max_steps"], config["world_size"], config["global_batch_size"]) == (64, 4, 1, 2)
    assert config["steps_per_epoch"] > 0 and config["data"] == str(shards_dir)
    logged = {k for row in first["history"] for k in row}
    assert {"epoch", "loss/G", "val/t1_to_t2/ssim_masked", "predictions/captions", "progress/_type"} <= logged
    assert "val/table" not in logged  # no one-row table artifact per validation
    captions = next(row["predictions/captions"] for row in first["history"] if "predictions/captions" in row)
    assert len(captions) == 2 * 4 and "T1→T2: input | translation | cycle | ground truth" in captions[0]
    assert next(row["progress/_type"] for row in first["history"] if "progress/_type" in row) == "video-file"
    vals = [row["val/t1_to_t2/ssim_masked"] for row in first["history"] if "val/t1_to_t2/ssim_masked" in row]
    assert first["summary"]["val/t1_to_t2/ssim_masked"] == {"max": max(vals), "last": vals[-1]}
    norms = [row["grad_norm/D"] for row in first["history"] if "grad_norm/D" in row]
    assert norms and first["summary"]["grad_norm/D"] == {"max": max(norms), "last": norms[-1]}
    assert ("model", {"best", "step-4", "latest"}) in first["artifacts"]
    info = json.loads((rundir.checkpoint_dir(run, 4) / rundir.CHECKPOINT_INFO).read_text())
    assert info["wandb"] == {"project": "mri-cyclegan", "id": first["id"]}

    train(*args, "--max_steps", 6, "--checkpoint_every", 6, "--resume", "auto")  # a resumed run continues its W&B run
    run_module("train.evaluate", "--checkpoint", rundir.checkpoint_dir(run, 6), "--data", shards_dir / "test", "--out", tmp_path / "report")
    resumed, evaluated = offline_runs(run, 3)[1:]
    assert resumed["id"] == evaluated["id"] == first["id"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    expected = report["directions"]["t1_to_t2"]["summary"]["ssim_masked"]["mean"]
    assert evaluated["summary"]["eval/t1_to_t2/ssim_masked"] == expected
    brightness = report["directions"]["t2_to_t1"]["summary"]["brightness"]
    assert (evaluated["summary"]["eval/t2_to_t1/brightness"], evaluated["summary"]["eval/t2_to_t1/brightness_std"]) == (
        brightness["mean"], brightness["std"])
    assert {"eval/subjects/_type", "eval/figure/_type"} <= {k for row in evaluated["history"] for k in row}

    shutil.rmtree(run / rundir.CHECKPOINTS)  # the folder reused for a fresh run: a new W&B run, not appended to the old one
    train(*args, "--max_steps", 2, "--checkpoint_every", 2)
    assert offline_runs(run, 4)[-1]["id"] not in (None, first["id"])


def exit_codes(run: Path) -> list[int]:
    """The exit code each offline W&B run in a run folder recorded, oldest first."""
    return [r.exit.exit_code for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")) for r in records(path)
            if r.WhichOneof("record_type") == "exit"]


def test_a_run_that_stops_with_an_error_is_failed_in_wandb_not_finished(shards_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CHECKPOINTS).write_text("")  # a file where the checkpoints go: the first checkpoint write fails
    result = train("--data", shards_dir, "--out", run, *SMALL, "--report_to", "wandb", "--max_steps", 2, "--checkpoint_every", 2,
                   check=False)
    assert result.returncode == 1 and "error: cannot write the step-2 checkpoint" in result.stderr, result.stderr[-2000:]
    assert exit_codes(run) == [1]
    shutil.rmtree(run)
    train("--data", shards_dir, "--out", run, *SMALL, "--report_to", "wandb", "--max_steps", 2, "--checkpoint_every", 2)
    assert exit_codes(run) == [0]
