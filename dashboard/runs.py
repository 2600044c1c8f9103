"""What the dashboard knows about a runs folder, read through the run-folder contract (train/rundir.py).
No Streamlit here, so it is fast to test and to benchmark. Nothing outside the runs root is read, and a broken
run becomes a RunInfo with an `error`, never an exception for the whole page."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from train import rundir
from train.config import read_yaml

if TYPE_CHECKING:  # pandas comes with Streamlit; the run list does not need it
    import pandas as pd

CONFIG_SUMMARY_KEYS = ("generator", "unet_depth", "size", "ngf", "batch_size", "lr", "lr_d", "gan_loss", "lambda_adv", "lambda_cycle",
                       "lambda_structure", "lambda_nce", "lambda_equivariance", "mixed_precision")
NAMING_OPTIONS = ("out", "run_name", "resume", "report_to", "trace_keys")  # and wandb*: where a run goes, not what it does
WANDB_URL = re.compile(r"https://wandb\.ai/[\w./-]+/runs/\w+")


class UnsafePath(ValueError):
    pass


def safe_child(root: Path, name: str) -> Path:
    """root/name for a plain folder name inside root; anything with '..', a separator or an absolute path is refused."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute() or ".." in name:
        raise UnsafePath(f"refused run name {name!r}: plain names inside the runs folder only")
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise UnsafePath(f"refused run name {name!r}: outside the runs folder")
    return path


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str = "crashed"  # running | finished | stopped | crashed | broken
    config: dict = field(default_factory=dict)
    steps: int = 0
    total_steps: int | None = None
    best: dict | None = None
    last: dict | None = None
    best_checkpoint_step: int | None = None
    error: str | None = None

    def row(self) -> dict:
        """One line of the run list."""
        best, last = self.best or {}, self.last or {}
        return {"run": self.name, "status": self.status, "steps": self.steps, "total": self.total_steps,  # scores first, then settings
                "best SSIM": best.get(rundir.VAL_SCORE), "best step": best.get("step"),
                **headline_scores(last, "last "),
                **{k: self.config.get(k) for k in CONFIG_SUMMARY_KEYS}, "problem": self.error or ""}


def headline_scores(val: dict, prefix: str = "") -> dict:
    """Masked SSIM and PSNR of each direction from a validation row, as table columns ("SSIM T1→T2", ...)."""
    return {f"{prefix}{label} {rundir.LABELS[d]}": val.get(rundir.val_name(d, metric))
            for label, metric in (("SSIM", "ssim_masked"), ("PSNR", "psnr_masked")) for d in rundir.DIRECTIONS}


def _tail_rows(path: Path, max_bytes: int = 64_000) -> list[dict]:
    """The last rows of metrics.jsonl without reading a long file whole."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        lines = f.read().decode(errors="replace").splitlines()[1 if size > max_bytes else 0:]
    rows = []
    for line in lines:
        try:
            rows.append(rundir.parse_json(line))
        except ValueError:
            continue
    return rows


def read_run(path: Path, now: float | None = None) -> RunInfo:
    info = RunInfo(path.name, path)
    try:
        config = read_yaml(path / rundir.CONFIG) if (path / rundir.CONFIG).exists() else None
        if config is not None and not isinstance(config, dict):
            raise ValueError("config.yaml is not a mapping")
        info.config = config or {}
        summary, metrics_path = rundir.read_summary(path), path / rundir.METRICS
        if summary is not None:
            info.status = summary["status"]
            info.steps, info.total_steps = summary["steps"], summary.get("total_steps")
            info.best, info.last = summary.get("best"), summary.get("last")
            info.best_checkpoint_step = summary.get("best_checkpoint_step")
        elif metrics_path.exists():
            rows = _tail_rows(metrics_path)
            info.steps = max((r.get("step", 0) for r in rows), default=0)
            vals = [r for r in rows if rundir.VAL_SCORE in r]
            info.last = vals[-1] if vals else None
            info.best = max(vals, key=lambda r: r[rundir.VAL_SCORE]) if vals else None
            beat = rundir.heartbeat_alive(path, now)
            info.status = "running" if beat else "crashed"
            if beat:
                info.steps, info.total_steps = beat["step"], beat["total_steps"]
                info.best_checkpoint_step = beat["best_checkpoint_step"]
        elif not info.config:
            info.status, info.error = "broken", "no config.yaml, metrics.jsonl or summary.json: not a run folder"
        else:
            info.status = "crashed"
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        info.status, info.error = "broken", f"{type(err).__name__}: {err}"
    return info


def inside(root: Path, path: Path) -> bool:
    """True when `path`, links followed, lies inside `root`: a link out of the runs folder is never read."""
    return path.resolve().is_relative_to(root.resolve())


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder in root; one that is a link to a folder outside root is listed as broken, and not read."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [read_run(p) if inside(root, p) else
            RunInfo(p.name, p, status="broken", error=f"a link to {p.resolve()}, outside the runs folder: not read")
            for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def metrics_table(run: Path):
    """All metrics rows of a run as a DataFrame (pandas comes with Streamlit)."""
    import pandas as pd

    return pd.DataFrame(rundir.read_metrics(run))


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    time: float | None
    size_mb: float
    val: dict
    best: bool
    error: str | None = None


def list_checkpoints(run: RunInfo) -> list[CheckpointInfo]:
    out = []
    for step, path in rundir.list_checkpoints(run.path):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
        try:
            info = rundir.parse_json((path / rundir.CHECKPOINT_INFO).read_text())
            missing = [n for n in rundir.GENERATORS.values() if not (path / n).is_file()]
            error = f"missing {', '.join(missing)}" if missing else None
            out.append(CheckpointInfo(step, path, info.get("time"), size, info.get("val") or {}, step == run.best_checkpoint_step, error))
        except (OSError, ValueError) as err:
            out.append(CheckpointInfo(step, path, None, size, {}, False, f"unreadable {rundir.CHECKPOINT_INFO}: {err}"))
    return out


def wandb_link(run: Path) -> str | None:
    """The W&B page of an online run, or the `wandb sync` command for an offline one."""
    folder = Path(run) / "wandb"
    if not folder.is_dir():
        return None
    offline = sorted(folder.glob("offline-run-*"))
    if offline:
        return f"wandb sync {offline[-1]}"
    for log in sorted(folder.glob("run-*/logs/debug.log"), reverse=True):
        if found := WANDB_URL.search(log.read_text(errors="replace")):
            return found.group(0)
    return None


def config_diff(runs: list[RunInfo]) -> list[dict]:
    """Settings whose values differ between the runs: one row per option, one column per run. Options that name
    rather than configure a run (its folder, W&B names) are left out; values are text, since one column holds
    options of several types (a column of mixed types is an Arrow error)."""
    keys = sorted({k for r in runs for k in r.config if k not in NAMING_OPTIONS and not k.startswith("wandb")})
    return [{"option": k, **{r.name: "" if r.config.get(k) is None else str(r.config.get(k)) for r in runs}} for k in keys
            if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def chart_series(merged: pd.DataFrame, columns: dict[str, str], x: str) -> pd.DataFrame:
    """Metrics of several runs in long form (x, series, value), a line per run and metric named "run · label".
    Runs that validated at different steps still draw: a wide pivot would hold NaN between each run's points, and
    line_chart draws no segment across a NaN. A metric that is zero throughout (a loss weighted 0) is left out."""
    import pandas as pd

    parts = []
    for column, label in columns.items():
        if column not in merged:
            continue
        points = merged.dropna(subset=[column]).groupby([x, "run"], as_index=False)[column].last()
        if points[column].any():
            parts.append(pd.DataFrame({x: points[x], "series": points["run"] + " · " + label, "value": points[column]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[x, "series", "value"])


def upscaled(tile: np.ndarray, min_px: int) -> np.ndarray:
    """Nearest-neighbour upscaling by a whole factor to at least min_px: every pixel stays a sharp square."""
    factor = max(1, -(-min_px // tile.shape[0]))
    return np.kron(tile, np.ones((factor, factor), tile.dtype))
