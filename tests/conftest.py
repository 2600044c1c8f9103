"""Shared fixtures: a small synthetic IXI (IXI geometry at 1/4 matrix), its shards at 64x64, and a run trained
on them for 40 steps."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
# `make test` runs a worker per core and each trains with two threads: OpenMP threads that sleep rather than spin
# while they wait cut the suite from 775 s to 549 s on 2 cores, and change no result (the thread count is the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Command-line tools whose main(argv) runs in the test process: each saves a new interpreter and ~5 s of imports.
IN_PROCESS = ("train.translate", "train.evaluate")


def _run_in_process(args) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a call, with what the process would have printed and exited with."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(ROOT):
        try:
            code = importlib.import_module(args[0]).main(list(map(str, args[1:])))
        except SystemExit as exit:
            code = exit.code
    if isinstance(code, str):  # SystemExit("error: ...") prints its message and exits 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(["python", "-m", *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def run_module(*args, check=True, env=None, timeout=600):
    """Run `python -m ...` from the repository root; returns the CompletedProcess."""
    if args[0] in IN_PROCESS and not env:
        result = _run_in_process(args)
    else:
        result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def ixi_tars(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ixi")
    run_module("shards", "synth", "--out", out, "--subjects", 10, "--seed", 1, "--downsample", 4)
    return out


@pytest.fixture(scope="session")
def shards_dir(ixi_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s64"
    run_module("shards", "pack", "--t1", ixi_tars / "IXI-T1.tar", "--t2", ixi_tars / "IXI-T2.tar", "--out", out,
               "--size", 64, "--shard-size", 100, "--workers", 2)
    return out


SMALL = ["--ngf", "16", "--ndf", "16", "--num_workers", "1", "--report_to", "none", "--log_every", "5", "--batch_size", "2"]


def train(*args, check=True, timeout=600):
    # two threads whatever the machine's cores or OMP_NUM_THREADS: a short GAN run's path is a draw of the summation
    # order too, and the tests that read a seed's outcome (the contrast guard, the healthy run) were measured with two
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "train/main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"train/main.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def trained(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    # --data relative, as the README types it: the run folder must still know where its shards are
    train("--data", os.path.relpath(shards_dir, ROOT), "--out", out, *SMALL, "--max_steps", 40, "--steps_per_epoch", 20, "--checkpoint_every", 10,
          "--checkpoints_total_limit", 2)
    return out
