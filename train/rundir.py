"""The run folder: the contract between the trainer and the dashboard (docs/run-folder.md).

    RUN/config.yaml                 resolved options
    RUN/metrics.jsonl               one flat JSON object per logged step or validation; always `step`, `epoch`
    RUN/checkpoints/step-NNNNNNN/   Accelerate state (resume) + G_t1_to_t2.safetensors, G_t2_to_t1.safetensors
                                    and checkpoint.json (step, epoch, time, val metrics, generator config)
    RUN/predictions/epoch-NNN.png   fixed val slices: input | translation | cycle | ground truth, both directions
    RUN/progress.gif                the prediction grids over the epochs
    RUN/summary.json                best and last metrics, total steps, images/s; `status` finished or stopped
    RUN/heartbeat.json              while training: time, host, pid, step, best checkpoint step, every HEARTBEAT_S

Every file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
GIF = "progress.gif"
CHECKPOINTS = "checkpoints"
PREDICTIONS = "predictions"
CHECKPOINT_INFO = "checkpoint.json"
HEARTBEAT = "heartbeat.json"
HEARTBEAT_S = 30  # a run whose heartbeat is older than 3 of these is not running (its process is gone or hung)
STOP = "STOP"  # create it to stop the run cleanly (checkpoint, exit 0); the trainer removes it when it stops
TRACE = "trace"  # only with --trace_keys: trace/keys-rank-N.txt, the train sample keys each rank read
GENERATORS = {"t1_to_t2": "G_t1_to_t2.safetensors", "t2_to_t1": "G_t2_to_t1.safetensors"}
CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
PREDICTION_RE = re.compile(r"^epoch-(\d{3,})\.png$")

# What metrics.jsonl rows hold, named once for the trainer, W&B and the dashboard (docs/run-folder.md):
# `loss/<LOSSES>` (means over the logging window), GRAD_NORMS (the window's largest, before clipping), and at each
# validation `val/<direction>/<VAL_METRICS>` (per-slice means), `val/<direction>/<VAL_BRIGHTNESS>` (over slices,
# train/metrics.py), `val/<contrast>_cycle/ssim` and VAL_SCORE, the mean masked SSIM that picks the best checkpoint.
DIRECTIONS = {"t1_to_t2": ("t1", "t2"), "t2_to_t1": ("t2", "t1")}  # direction: (source, target) contrast
REVERSE = {"t1_to_t2": "t2_to_t1", "t2_to_t1": "t1_to_t2"}
LABELS = {"t1_to_t2": "T1→T2", "t2_to_t1": "T2→T1"}
LOSSES = ("G", "G_adv", "cycle", "identity", "structure", "nce", "aleatoric", "equivariance", "D", "D_t1", "D_t2")
GRAD_NORMS = ("grad_norm/G", "grad_norm/D")  # both generators' gradients together; both discriminators'
VAL_METRICS = {"ssim": "max", "ssim_masked": "max", "psnr": "max", "psnr_masked": "max", "mae_masked": "min",
               "texture": None}  # the better direction of each; texture is best at 1, not at an end
VAL_BRIGHTNESS = ("brightness", "brightness_std")  # the area-weighted mean and std of each slice's mean over the truth's
VAL_CYCLE = ("val/t1_cycle/ssim", "val/t2_cycle/ssim")
VAL_SCORE = "val/ssim_masked_mean"


def val_name(direction: str, metric: str) -> str:
    return f"val/{direction}/{metric}"


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:07d}"


def prediction_path(run: Path, epoch: int) -> Path:
    return Path(run) / PREDICTIONS / f"epoch-{epoch:03d}.png"


def trace_path(run: Path, rank: int) -> Path:
    return run / TRACE / f"keys-rank-{rank}.txt"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with checkpoint.json), oldest first."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and (p / CHECKPOINT_INFO).is_file()]
    return sorted(found)


def list_predictions(run: Path) -> list[tuple[int, Path]]:
    folder = Path(run) / PREDICTIONS
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := PREDICTION_RE.match(p.name)))


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def parse_json(text: str):
    """json.loads for run-folder files, which may come from elsewhere: JSON nested deeper than Python's parser
    goes (a 200 KB line of '[') is a ValueError like any other damage, not a RecursionError past every handler."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class Heartbeat:
    """Rewrites RUN/heartbeat.json every HEARTBEAT_S seconds from a thread, so that a run is seen as alive through
    slow steps and long validations, and as dead soon after its process is: `fields()` gives what it reports."""

    def __init__(self, run: Path, fields):
        self.path, self.fields, self.done = Path(run) / HEARTBEAT, fields, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _write(self) -> None:
        write_json(self.path, {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **self.fields()})

    def _beat(self) -> None:
        while not self.done.is_set():
            self._write()
            self.done.wait(HEARTBEAT_S)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._write()  # the last step, for a reader that looks before summary.json is written


def heartbeat_alive(run: Path, now: float | None = None) -> dict | None:
    """The run's heartbeat when its trainer is alive: fresh, and on this host its process still exists."""
    try:
        beat = parse_json((Path(run) / HEARTBEAT).read_text())
        fresh = (now or time.time()) - beat["time"] < 3 * HEARTBEAT_S
        if beat["host"] == socket.gethostname():
            os.kill(beat["pid"], 0)  # raises when there is no such process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return beat if fresh else None


class MetricsLog:
    """Appends flat JSON lines. On resume, rows past the resumed step are dropped so the curve stays continuous."""

    def __init__(self, run: Path, resume_step: int | None = None):
        self.path = Path(run) / METRICS
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _row_step(line) is not None and _row_step(line) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        assert "step" in row and "epoch" in row, "every metrics row carries step and epoch"
        with open(self.path, "a") as f:
            f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
            f.flush()


def _row_step(line: str) -> int | None:
    try:
        return int(parse_json(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a killed run


def read_summary(run: Path) -> dict | None:
    """A finished or stopped run's summary.json, None while it runs (or when it crashed before writing one).
    ValueError if it is not a JSON object."""
    path = Path(run) / SUMMARY
    if not path.exists():
        return None
    summary = parse_json(path.read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a JSON object")
    return summary


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(parse_json(line))
        except ValueError:
            continue
    return rows


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1,1] or [0,1] float image -> uint8 (values below 0 are taken as [-1,1] scaling)."""
    image = np.asarray(image, np.float32)
    if image.min() < 0:
        image = (image + 1) / 2
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


PREDICTION_COLUMNS = ("input", "translation", "cycle", "ground truth")
PREDICTION_ROWS = ("t1_to_t2", "t2_to_t1")  # the two rows of each val slice, in this order
GRID_GAP = 2


def prediction_grid(rows: list[list[np.ndarray]], gap: int = GRID_GAP) -> np.ndarray:
    """Rows of equally sized [0,1] images -> one uint8 grid with thin gaps."""
    h, w = rows[0][0].shape
    cols = max(len(r) for r in rows)
    grid = np.zeros((len(rows) * (h + gap) - gap, cols * (w + gap) - gap), np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = to_uint8(image)
    return grid


def split_grid(grid: np.ndarray, columns: int = len(PREDICTION_COLUMNS), gap: int = GRID_GAP) -> list[list[np.ndarray]]:
    """A prediction grid back into its rows of square tiles."""
    size = (grid.shape[1] + gap) // columns - gap
    if size < 1:  # narrower than a row of one-pixel tiles: nothing to split
        return []
    rows = (grid.shape[0] + gap) // (size + gap)
    return [[grid[i * (size + gap):i * (size + gap) + size, j * (size + gap):j * (size + gap) + size] for j in range(columns)]
            for i in range(rows)]


MAX_PREDICTION_PIXELS = 2**24  # 4096²; the trainer's grid of 8 val slices at 256² has 4.3 M


def read_prediction(path: Path) -> list[list[np.ndarray]]:
    """An epoch's prediction grid in rows of tiles. ValueError for a file the trainer cannot have written (run
    folders are shared): unreadable, larger than MAX_PREDICTION_PIXELS, or not whole direction pairs of square tiles."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PREDICTION_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels, more than a prediction grid has (MAX_PREDICTION_PIXELS)")
            grid = np.asarray(im.convert("L"))
    except (OSError, Image.DecompressionBombError) as err:  # a damaged PNG is an OSError (UnidentifiedImageError)
        raise ValueError(f"not a readable PNG ({type(err).__name__}: {err})") from None
    rows = split_grid(grid)
    size = rows[0][0].shape[0] if rows else 0
    whole = (len(rows) * (size + GRID_GAP) - GRID_GAP, len(PREDICTION_COLUMNS) * (size + GRID_GAP) - GRID_GAP)
    if size < 1 or len(rows) % len(PREDICTION_ROWS) or grid.shape != whole:
        raise ValueError(f"{grid.shape[1]}x{grid.shape[0]} pixels: not a grid of {len(PREDICTION_COLUMNS)} square tiles per row "
                         f"and {len(PREDICTION_ROWS)} rows per val slice")
    return rows


def save_prediction(run: Path, epoch: int, grid: np.ndarray) -> Path:
    path = prediction_path(run, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path


def write_gif(run: Path, seconds_per_frame: float = 0.5) -> Path | None:
    frames = [np.asarray(Image.open(p).convert("L")) for _, p in list_predictions(run)]
    if not frames:
        return None
    path = Path(run) / GIF
    tmp = path.with_name(f".{GIF}.tmp.gif")
    imageio.mimsave(tmp, frames, duration=seconds_per_frame, loop=0)
    os.replace(tmp, path)
    return path
