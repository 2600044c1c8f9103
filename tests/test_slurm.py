"""`sbatch slurm/train.sh` under a real one-node Slurm (installed and started by slurm/setup-local.sh):
a run to completion, pre-emption with checkpoint + requeue + resume, and bad input failing fast in the log.
Skipped, with the reason, only where the Slurm daemons cannot start (e.g. not root)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest

from conftest import ROOT
from train import rundir

TINY = ["--ngf", "16", "--ndf", "16", "--num_workers", "0", "--report_to", "none", "--batch_size", "2", "--log_every", "10"]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    try:
        setup = subprocess.run(["bash", "slurm/setup-local.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm/setup-local.sh did not finish in 15 minutes")
    if setup.returncode != 0:
        pytest.skip(f"Slurm could not be started by slurm/setup-local.sh: {(setup.stderr or setup.stdout)[-500:]}")


def sbatch(log_dir, *args, wait=True, processes=2):
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15",
           f"--output={log_dir}/%x-%j.out", f"--export=ALL,CPU_PROCESSES_PER_NODE={processes}"]
    result = subprocess.run([*cmd, "slurm/train.sh", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    job = result.stdout.strip().split(";")[0]
    assert job.isdigit(), result.stderr
    # not `sbatch --wait`: it polls with a growing back-off, up to half a minute after the job has ended
    return job, (0 if final_state(job) == "COMPLETED" else 1) if wait else None


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(rf"\b{field}=(\S+)", shown).group(1)


def final_state(job: str) -> str:
    """The job's state once Slurm has finished with it."""
    deadline = time.time() + 600
    while (state := job_field(job, "JobState")) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


def log_of(log_dir, job) -> str:
    return next(log_dir.glob(f"*-{job}.out")).read_text(errors="replace")


def test_sbatch_trains_to_completion(slurm, shards_dir, tmp_path):
    job, code = sbatch(tmp_path, "--data", shards_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 20, "--checkpoint_every", 10)
    assert code == 0 and final_state(job) == "COMPLETED", log_of(tmp_path, job)[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["status"] == "finished" and summary["steps"] == 20
    assert [s for s, _ in rundir.list_checkpoints(run)] == [10, 20]
    assert (run / rundir.CONFIG).is_file() and (run / rundir.GIF).is_file() and rundir.list_predictions(run)
    assert "2 CPU process(es) per node" in log_of(tmp_path, job)


def test_preemption_checkpoints_requeues_and_resumes(slurm, shards_dir, tmp_path):
    run = tmp_path / "run"
    job, _ = sbatch(tmp_path, "--data", shards_dir, "--out", run, *TINY, "--max_steps", 100, "--checkpoint_every", 1000, wait=False)
    deadline = time.time() + 300
    while not (run / rundir.METRICS).exists():  # training has started
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.time() + 300
    while job_field(job, "Restarts") == "0":  # the job checkpoints and requeues itself
        assert time.time() < deadline, "the job did not requeue"
        time.sleep(0.5)
    # it starts again once its old credential expires (cred_expire in slurm/setup-local.sh); starting it
    # sooner by hand gets it killed as "Job credential revoked"
    state = final_state(job)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", log[-3000:]
    stopped_at = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 0 < stopped_at < 100 and f"resumed from {run / 'checkpoints'}/step-{stopped_at:07d}" in log
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["status"] == "finished" and summary["steps"] == 100
    steps = [r["step"] for r in rundir.read_metrics(run) if "loss/G" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 100
    assert not (run / rundir.STOP).exists()


@pytest.mark.parametrize("case", ["missing-data", "fp16-without-gpu", "stale-checkpoint"])
def test_bad_input_fails_fast_with_a_clear_log(case, slurm, shards_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--data", shards_dir, "--out", run, *TINY, "--max_steps", 4]
    expect = {"missing-data": "no such folder", "fp16-without-gpu": "fp16 needs a GPU",
              "stale-checkpoint": "different configuration"}[case]
    if case == "missing-data":
        args[1] = tmp_path / "nowhere"
    elif case == "fp16-without-gpu":
        args += ["--mixed_precision", "fp16"]
    else:
        sbatch(tmp_path, *args, processes=1)  # a finished run at ngf 16 ...
        args = [a if a != "16" else "8" for a in args]  # ... resumed (--resume auto) with other widths
    start = time.time()
    job, code = sbatch(tmp_path, *args, processes=1)
    log = log_of(tmp_path, job)
    assert code != 0 and final_state(job) == "FAILED" and expect in log, log[-3000:]
    assert time.time() - start < 120, "an error must not wait for the time limit"
