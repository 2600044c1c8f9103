"""Weights & Biases: which mode, which run, and what the trainer and `train.evaluate` send to it.

A run's W&B id is recorded in every checkpoint (checkpoint.json `wandb`): a resumed run continues its W&B run,
a fresh run gets a new one even in a reused folder, and `train.evaluate` adds its report to the run that made
the checkpoint. Only the main process calls into W&B. docs/training.md lists what is logged.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import numpy as np

from train import rundir

# figures whose W&B summary holds the run's best validation value, or its largest gradient norm (a spike), and the
# last, as `last`; others keep the last
SUMMARY_KEPT = {**{rundir.val_name(d, m): goal for d in rundir.DIRECTIONS for m, goal in rundir.VAL_METRICS.items() if goal},
               **{name: "max" for name in (*rundir.VAL_CYCLE, *rundir.GRAD_NORMS)}, rundir.VAL_SCORE: "max"}


def wandb_mode(report_to: str, flag: str) -> str:
    """--report_to none, then --wandb, then $WANDB_MODE (W&B's own switch), then online with a login, else offline."""
    if report_to == "none":
        return "disabled"
    if flag:
        return flag
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    logged_in = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def new_run_id(name: str) -> str:
    """A fresh W&B run id: the run's name (in the characters W&B allows) and a random suffix."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:40]}-{secrets.token_hex(4)}"


def start(accelerator, config, resolved: dict, out: Path, run_id: str) -> None:
    """The W&B run through Accelerate's tracker: named after the run folder unless --run_name, resumed by id,
    its files in the run folder; `resolved` is the config as the run really uses it."""
    accelerator.init_trackers(config.wandb_project, config=resolved, init_kwargs={"wandb": {
        "name": config.run_name or out.name, "group": config.wandb_group or None, "dir": str(out),
        "tags": [t for t in config.wandb_tags.split(",") if t] or None, "resume": "allow", "id": run_id}})
    if accelerator.is_main_process:
        define_metrics(accelerator.get_tracker("wandb", unwrap=True))


def finish_failed(exit_code) -> None:
    """Close this process's W&B run as failed. A SystemExit raised out of the trainer never passes through W&B's
    hooks (sys.exit and the excepthook), which would then record the exit as a success."""
    import wandb
    if wandb.run is not None:
        wandb.run.finish(exit_code=exit_code if isinstance(exit_code, int) and exit_code else 1)


def define_metrics(run) -> None:
    """Validation summaries hold the best value of the run, and gradient norms the largest, not the last one (W&B
    globs match suffixes only)."""
    for name, goal in SUMMARY_KEPT.items():
        run.define_metric(name, summary=f"{goal},last")


def slice_images(rows: list[list[np.ndarray]], captions: list[str]) -> list:
    """One captioned image per preview row (input | translation | cycle | truth, each in [0,1])."""
    import wandb

    return [wandb.Image((np.concatenate(row, axis=1).clip(0, 1) * 255).round().astype(np.uint8), caption=caption)
            for row, caption in zip(rows, captions)]


def video(path: Path):
    import wandb

    return wandb.Video(str(path), format="gif")


def log_checkpoint(run, checkpoint: Path, files: list[str], aliases: list[str]) -> None:
    """The inference side of a checkpoint (generators and checkpoint.json, not the optimizer state) as a model artifact."""
    import wandb

    artifact = wandb.Artifact(f"{run.id}-generators", type="model", metadata={"checkpoint": str(checkpoint)})
    for name in files:
        artifact.add_file(str(checkpoint / name), name=name)
    run.log_artifact(artifact, aliases=aliases)


def log_evaluation(recorded: dict, mode: str, run_dir: Path, report: dict, figure: Path) -> str:
    """Add an evaluation to the W&B run that trained the checkpoint: its summary under `eval/`, a per-subject table
    and the figure. Returns the run id."""
    import wandb

    run = wandb.init(project=recorded["project"], id=recorded["id"], resume="allow", mode=mode, dir=str(run_dir),
                     job_type="evaluate", settings=wandb.Settings(silent=True))
    try:
        summary, rows = {}, []
        for direction, result in report["directions"].items():
            for metric, stats in result["summary"].items():
                summary[f"eval/{direction}/{metric}"] = stats["mean"]
                summary[f"eval/{direction}/{metric}_std"] = stats["std"]
            rows += [{"direction": direction, **subject} for subject in result["subjects"]]
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        run.summary.update(summary)
        run.log({"eval/subjects": table, "eval/figure": wandb.Image(str(figure))})
        return run.id
    finally:
        run.finish()
