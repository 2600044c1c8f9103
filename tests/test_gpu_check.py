"""bench/gpu_check.py, the one-command GPU check, in its --cpu smoke mode: so that it runs when a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_smoke_run_checks_precision_resume_throughput_and_loaders(shards_dir, tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--data", shards_dir, "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["precision"], r["compute_dtype"], r["resume_exact"]) for r in results["precision"]] == [("bf16", "bfloat16", True)]
    assert results["precision"][0]["grad_norm_G"] > 0  # the clipped run reports its norms
    assert [(r["compile"], r["batch"]) for r in results["throughput"]] == [("no", 2)]
    # the steady rate of the second half, not the whole run's, which start-up (and on a GPU compilation) lowers
    assert all(r["images_per_s"] > r["whole_run_images_per_s"] > 0 for r in results["throughput"])
    plain, augmented = results["data"]["plain"], results["data"]["augmented"]
    assert all(r["slices_per_s_per_worker"] > 0 and r["workers_per_contrast"] >= 1 for r in (plain, augmented))
    assert augmented["slices_per_s_per_worker"] < plain["slices_per_s_per_worker"]  # resampling each slice costs the worker
    assert "| bf16 | bfloat16 |" in done.stdout and "one loader worker augmenting:" in done.stdout
