"""Pack T1/T2 sources into WebDataset shards, split by subject.

The main process lists the sources, assigns subjects to splits, and writes shards in a fixed order; worker
processes read and preprocess one subject each. At most 2 x workers subjects are in flight, so memory stays
bounded whatever the dataset size. A shard is written as `NAME.tar.tmp` and renamed when complete; a state
file records finished shards, so `--resume` carries on after an interruption.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import webdataset as wds
from tqdm import tqdm

from . import __version__
from .format import (FORMAT_VERSION, MANIFEST, SPLITS, STREAMS, ShardsError, encode_sample, safe_subject,
                     sample_key, shard_name, write_json_atomic)
from .preprocess import VolumeError, inside, kept_slices, resample, standardize, standardize_image, to_image
from .register import MAX_ROTATION_DEG, MAX_TRANSLATION_MM, MIN_MASK_DICE, check, register_rigid
from .sources import VolumeRef, list_source, load_ref

STATE = ".pack-state.json"


@dataclass(frozen=True)
class PackOptions:
    size: int = 256
    fov_mm: float = 256.0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    shard_size: int = 1000
    register: str = "rigid"  # T2 onto T1 before paired slices are cut: "rigid" or "none" (shards/register.py)
    bias_correction: str = "none"  # "n4" divides out each volume's bias field first (shards/bias.py)


REGISTER = ("rigid", "none")


@dataclass(frozen=True)
class Task:
    """One unit of work: a subject's volume for a train stream, or a subject's T1+T2 pair for val/test."""

    split: str
    stream: str
    subject: str
    refs: tuple[VolumeRef, ...]
    held_out: bool = False  # never trained on, even when it cannot be paired


class Unpaired(VolumeError):
    """A val/test subject whose T2 could not be registered to its T1; `record` says how far it got."""

    def __init__(self, reason: str, record: dict):
        super().__init__(reason)
        self.record = record


def assign_splits(t1: dict[str, VolumeRef], t2: dict[str, VolumeRef], fractions, seed: int,
                  held_out: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Deterministic subject split. Val/test draw only from subjects with both contrasts (they are paired).
    `held_out` subjects never go to train: they are dealt to test and val first, which grow to hold them."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not 0.999 < sum(fractions) < 1.001:
        raise ValueError(f"--split must be three non-negative fractions summing to 1, got {fractions}")
    everyone = sorted(set(t1) | set(t2))
    paired = [s for s in everyone if s in t1 and s in t2]
    rng = np.random.default_rng(seed)
    paired = [paired[i] for i in rng.permutation(len(paired))]
    n_val, n_test = (round(f * len(everyone)) for f in fractions[1:])
    if len(paired) >= 3:  # a requested split is never left empty when there are subjects to fill it
        n_val, n_test = (max(n, 1) if f > 0 else 0 for n, f in zip((n_val, n_test), fractions[1:]))
    n_val = min(n_val, len(paired))
    n_test = min(n_test, len(paired) - n_val)
    held = [s for s in paired if s in held_out]
    rest = [s for s in paired if s not in held_out]
    val, test = held[1::2], held[0::2]
    fill = max(0, n_val - len(val))
    val, test = val + rest[:fill], test + rest[fill:fill + max(0, n_test - len(test))]
    kept_out = set(val) | set(test) | set(held_out)
    return {"train": [s for s in everyone if s not in kept_out], "val": sorted(val), "test": sorted(test)}


def plan(t1_refs, t2_refs, options: PackOptions, lesion_refs=(), holdout=frozenset()) -> tuple[list[Task], dict[str, list[str]]]:
    """Tasks in writing order, and the split. Subjects with a lesion mask are held out like `holdout`."""
    t1 = {r.subject: r for r in t1_refs}
    t2 = {r.subject: r for r in t2_refs}
    lesion = {r.subject: r for r in lesion_refs}
    splits = assign_splits(t1, t2, options.split, options.seed, frozenset(holdout) | frozenset(lesion))
    tasks = [Task("train", c, s, (refs[s],)) for c, refs in (("t1", t1), ("t2", t2)) for s in splits["train"] if s in refs]
    held = frozenset(holdout) | frozenset(lesion)
    tasks += [Task(split, "paired", s, (t1[s], t2[s]) + ((lesion[s],) if s in lesion else ()), s in held)
              for split in ("val", "test") for s in splits[split]]
    return tasks, splits


def read_holdout(path) -> frozenset[str]:
    """Subject ids, one per line; '#' starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ShardsError(f"--holdout {path}: cannot read ({err.strerror})") from err
    ids = [line.split("#", 1)[0].strip() for line in lines]
    return frozenset(safe_subject(i) for i in ids if i)


def process(task: Task, options: PackOptions) -> dict:
    """Read and preprocess one task in a worker. Returns samples, per-file info, skipped files, the
    registration record of a paired task, and, for a pair that failed registration, its volumes' train samples."""
    files, volumes, registration = [], {}, []
    ref = task.refs[0]
    result = {"task": task, "samples": [], "files": files, "skipped": [], "registration": registration, "fallback": {}}
    try:
        for ref in task.refs:
            loaded, md5 = load_ref(ref)
            files.append({"file": ref.name, "md5": md5, "subject": ref.subject, "contrast": ref.contrast})
            volumes[ref.contrast] = loaded, ref
        if task.stream == "paired":
            result["samples"], record = _paired(volumes, options)
            registration.append({"subject": task.subject, **record})
        else:
            result["samples"] = _unpaired(volumes[task.stream], options)
    except Unpaired as err:
        registration.append({"subject": task.subject, **err.record, "paired": False, "reason": str(err)})
        fate = "held out, so not trained on either" if task.held_out else "its volumes went to train"
        result["skipped"].append({"file": ref.name, "reason": f"not paired: {err}; {fate}"})
        if not task.held_out:
            result["fallback"] = {c: _unpaired(volumes[c], options) for c in ("t1", "t2")}
        return result
    except (VolumeError, OSError, ValueError) as err:
        result["skipped"].append({"file": ref.name, "reason": str(err)})
        return result
    if not result["samples"]:
        result["skipped"].append({"file": ref.name, "reason": "no axial slice holds foreground"})
    return result


def _meta(ref: VolumeRef, contrasts, z: int, spacing, normalization: dict) -> dict:
    return {"subject": ref.subject, "site": ref.site, "contrasts": list(contrasts), "slice": int(z),
            "spacing_mm": spacing, "normalization": normalization, "source": ref.name}


def _unpaired(volume, options: PackOptions) -> list[dict]:
    loaded, ref = volume
    if ref.kind == "image":
        normalized, _, norm = standardize_image(loaded, options.size)
        return [encode_sample(sample_key(ref.subject, 0), {ref.contrast: normalized},
                              _meta(ref, [ref.contrast], 0, None, norm))]
    grid, normalized, mask, norm = standardize(*loaded[:2], options.size, options.fov_mm, options.bias_correction)
    spacing = [float(grid.affine[i, i]) for i in range(3)]
    return [encode_sample(sample_key(ref.subject, z), {ref.contrast: to_image(normalized[:, :, z])},
                          _meta(ref, [ref.contrast], z, spacing, norm))
            for z in kept_slices(mask)]


def _paired(volumes, options: PackOptions) -> tuple[list[dict], dict]:
    """T2 registered to T1 and resampled onto the T1 grid; slices kept where both hold foreground; mask =
    both foregrounds. Returns the samples and the registration record; raises Unpaired when the
    registration fails its quality check."""
    (t1, t1_ref), (t2, t2_ref) = volumes["t1"], volumes["t2"]
    if t1_ref.kind == "image" or t2_ref.kind == "image":
        if t1_ref.kind != t2_ref.kind:
            raise VolumeError(f"{t1_ref.name}: cannot pair a 2D image with a volume")
        (n1, m1, norm1), (n2, m2, norm2) = (standardize_image(v, options.size) for v in (t1, t2))
        return [encode_sample(sample_key(t1_ref.subject, 0), {"t1": n1, "t2": n2},
                              _meta(t1_ref, ["t1", "t2"], 0, None, {"t1": norm1, "t2": norm2}), mask=m1 & m2)], \
            {"method": "none (2D images)"}
    grid, n1, m1, norm1 = standardize(*t1[:2], options.size, options.fov_mm, options.bias_correction)
    correct = np.eye(4)
    if options.register == "rigid":
        registration = register_rigid(t1[0], t1[1], t2[0], t2[1])
        correct = np.linalg.inv(registration.matrix)
        t2 = (t2[0], correct @ t2[1], t2[2])
    _, n2, m2, norm2 = standardize(*t2[:2], options.size, options.fov_mm, options.bias_correction, grid)
    both = m1 & m2
    head = np.argwhere(m1 | m2)  # IXI's T2 covers less of the head than T1: compare where both looked
    seen = tuple(head[inside(t2[0].shape, t2[1], grid, head)].T)
    dice = float(2 * both[seen].sum() / max(1, m1[seen].sum() + m2[seen].sum()))
    if options.register == "rigid":
        record = registration.record(dice)
        failure = check(registration, dice)
        if failure:
            raise Unpaired(failure, record)
    else:
        record = {"method": "none", "mask_dice": round(dice, 4)}
    area = both.sum(axis=(0, 1))
    keep = [z for z in kept_slices(m1) if area[z] >= 0.5 * m1[:, :, z].sum()]
    spacing = [float(grid.affine[i, i]) for i in range(3)]
    meta = {"t1": norm1, "t2": norm2}
    lesion = _lesion_mask(volumes["lesion"], grid, correct) if "lesion" in volumes else None
    return [encode_sample(sample_key(t1_ref.subject, z), {"t1": to_image(n1[:, :, z]), "t2": to_image(n2[:, :, z])},
                          _meta(t1_ref, ["t1", "t2"], z, spacing, meta), mask=to_image(both[:, :, z]),
                          lesion=None if lesion is None else to_image(lesion[:, :, z]))
            for z in keep], {**record, "paired": True}


def _lesion_mask(volume, grid, correct: np.ndarray) -> np.ndarray:
    """A lesion mask (on the T2 grid, moved by T2's registration `correct`) resampled onto the paired grid:
    trilinear, then half-way threshold."""
    (data, affine, _), ref = volume
    if ref.kind != "nifti":
        raise VolumeError(f"{ref.name}: lesion masks must be NIfTI volumes")
    return resample((data > 0).astype(np.float32), correct @ affine, grid) >= 0.5


class StreamWriter:
    """Writes one stream's shards, closing a shard at a subject boundary once it holds shard_size samples."""

    def __init__(self, folder: Path, stream: str, shard_size: int, done: list[dict]):
        self.folder, self.stream, self.shard_size = folder, stream, shard_size
        self.done = done  # [{name, subjects, samples}] of finished shards, shared with the state file
        self.writer, self.subjects, self.count = None, [], 0

    def add(self, subject: str, samples: list[dict]) -> bool:
        """Write a subject's samples; returns True when this closed a shard."""
        if self.writer is None:
            self.tmp = self.folder / (shard_name(self.stream, len(self.done)) + ".tmp")
            self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=0)
        for sample in samples:
            self.writer.write(sample)
        self.subjects.append(subject)
        self.count += len(samples)
        if self.count >= self.shard_size:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        name = shard_name(self.stream, len(self.done))
        os.replace(self.tmp, self.folder / name)
        self.done.append({"name": name, "subjects": self.subjects, "samples": self.count})
        self.writer, self.subjects, self.count = None, [], 0


def pack(t1_src, t2_src, out, options: PackOptions = PackOptions(), workers: int | None = None,
         resume: bool = False, strict: bool = False, progress: bool = True, lesions_src=None, holdout_file=None) -> dict:
    """Pack both sources into `out`. Returns the manifest. Raises ShardsError when nothing usable remains,
    or under `strict` when anything was skipped. Subjects with a mask in `lesions_src`, or listed in
    `holdout_file`, go to val/test only; their masks travel with their paired slices."""
    out = Path(out)
    t1_refs, t1_skipped = list_source(t1_src, "t1")
    t2_refs, t2_skipped = list_source(t2_src, "t2")
    lesion_refs, lesion_skipped = list_source(lesions_src, "lesion") if lesions_src else ([], [])
    holdout = read_holdout(holdout_file) if holdout_file else frozenset()
    tasks, splits = plan(t1_refs, t2_refs, options, lesion_refs, holdout)
    held_out = sorted(holdout | {r.subject for r in lesion_refs})
    unpaired_held = [s for s in held_out if s not in splits["val"] + splits["test"]]
    listing_skipped = t1_skipped + t2_skipped + lesion_skipped + [
        {"file": s, "reason": "held out of training, but without both T1 and T2 it cannot be a paired val/test subject"}
        for s in unpaired_held]
    fingerprint = hashlib.sha256(json.dumps([asdict(options), [asdict(t) for t in tasks]], sort_keys=True, default=str).encode()).hexdigest()
    state = _open_state(out, fingerprint, resume)
    finished = {(s, stream, subject) for s in SPLITS for stream in STREAMS[s]
                for shard in state["streams"][f"{s}/{stream}"] for subject in shard["subjects"]}
    writers = {f"{s}/{stream}": StreamWriter(out / s, stream, options.shard_size, state["streams"][f"{s}/{stream}"])
               for s in SPLITS for stream in STREAMS[s]}
    # a pair whose registration failed went to train instead: its train shard finishes it
    todo = [t for t in tasks if (t.split, t.stream, t.subject) not in finished
            and not (t.stream == "paired" and ("train", "t1", t.subject) in finished)]
    pending = {key: [] for key in RECORDED}
    started = time.time()
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        window: deque = deque()
        bar = tqdm(total=len(todo), desc="pack", unit="volume", disable=not progress)
        queue = iter(todo)
        for task in queue:  # keep at most 2 x workers subjects in flight: bounded memory
            window.append(pool.submit(process, task, options))
            if len(window) < 2 * workers:
                continue
            _drain(window.popleft().result(), writers, state, pending, out)
            bar.update()
        while window:
            _drain(window.popleft().result(), writers, state, pending, out)
            bar.update()
        bar.close()
    for writer in writers.values():
        writer.close()
    _record(state, pending)
    held = {"subjects": held_out, "lesion_masks": sorted(r.subject for r in lesion_refs)}
    manifest = _manifest(out, state, splits, held, options, t1_src, t2_src, listing_skipped, time.time() - started, len(todo))
    write_json_atomic(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    train = manifest["splits"]["train"]["slices"]
    if not (train["t1"] and train["t2"]):
        raise ShardsError(f"{out}: nothing usable remains: train has {train['t1']} T1 and {train['t2']} T2 slices; see skipped in {out / MANIFEST}")
    if strict and manifest["skipped"]:
        first = manifest["skipped"][0]
        raise ShardsError(f"--strict: {len(manifest['skipped'])} file(s) skipped, e.g. {first['file']}: {first['reason']}")
    return manifest


def _init_worker(parent: int) -> None:
    """Workers are the parallelism: keep torch from oversubscribing the cores. And no transparent huge pages for
    numpy's arrays: a worker allocates and frees about a GB of volume-sized arrays per volume, and the kernel's
    work on huge pages for them doubled the workers' system time (packing 1.2x faster without; docs/benchmarks.md)."""
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    # numpy's private switch for what NUMPY_MADVISE_HUGEPAGE=0 does at import, which forked workers have passed;
    # a numpy without it packs as fast as it did before
    set_hugepage = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if set_hugepage is not None:
        set_hugepage(False)
    _exit_with(parent)


def _exit_with(parent: int) -> None:
    """Without this a worker of a pack that is killed (SIGKILL, the OOM killer) lives on, holding its memory, blocked
    writing a result into a pipe whose both ends it inherited. Linux: the kernel kills it when the thread that forked
    it exits (the pool forks from the thread that submits, the main one). Elsewhere the worker is left as it was."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


RECORDED = ("files", "skipped", "registration")  # what a task reports besides samples, kept in the state file


def _record(state: dict, pending: dict) -> None:
    for key in RECORDED:
        state[key] += pending[key]
        pending[key].clear()


def _drain(result, writers, state, pending: dict, out: Path) -> None:
    task = result["task"]
    for skip in result["skipped"]:
        tqdm.write(f"skipped {skip['file']}: {skip['reason']}")
    for key in RECORDED:
        pending[key] += result[key]
    outputs = {f"{task.split}/{task.stream}": result["samples"], **{f"train/{c}": s for c, s in result["fallback"].items()}}
    closed = [writers[stream].add(task.subject, samples) for stream, samples in outputs.items() if samples]
    if any(closed):  # a shard is final: what fed it so far is now safe to record for --resume
        _record(state, pending)
        write_json_atomic(out / STATE, state)


def _open_state(out: Path, fingerprint: str, resume: bool) -> dict:
    existing = list(out.glob("*/*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    state_path = out / STATE
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state["fingerprint"] != fingerprint:
            raise ShardsError(f"{out}: --resume with different sources or options than the interrupted run; use a new folder")
        for tmp in out.glob("*/*.tar.tmp"):
            tmp.unlink()
        return state
    if resume and (out / MANIFEST).exists():
        raise ShardsError(f"{out}: already complete (manifest.json exists); nothing to resume")
    if existing or state_path.exists():
        raise ShardsError(f"{out}: already holds shards; pass --resume to continue an interrupted run, or choose an empty folder")
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "streams": {f"{s}/{stream}": [] for s in SPLITS for stream in STREAMS[s]},
             **{key: [] for key in RECORDED}}
    write_json_atomic(state_path, state)
    return state


def _manifest(out, state, splits, held_out, options: PackOptions, t1_src, t2_src, listing_skipped, seconds, volumes) -> dict:
    split_info = {}
    for split in SPLITS:
        streams = {stream: state["streams"][f"{split}/{stream}"] for stream in STREAMS[split]}
        written = sorted({s for shards in streams.values() for shard in shards for s in shard["subjects"]})
        split_info[split] = {
            "subjects": written,
            "slices": {stream: sum(sh["samples"] for sh in shards) for stream, shards in streams.items()},
            "shards": {stream: [sh["name"] for sh in shards] for stream, shards in streams.items()},
            "shard_samples": {sh["name"]: sh["samples"] for shards in streams.values() for sh in shards},  # readers check these
        }
    return {
        "format_version": FORMAT_VERSION,
        "tool": f"mri-cyclegan shards {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": asdict(options),
        "sources": {"t1": str(t1_src), "t2": str(t2_src)},
        "files": sorted(state["files"], key=lambda f: f["file"]),
        "planned_splits": splits,
        "held_out": held_out,  # subjects kept out of train (val/test only), and those with lesion masks
        "splits": split_info,
        "image_size": options.size,
        "spacing_mm": options.fov_mm / options.size,
        "orientation": "axial slices of a RAS grid; image rows anterior->posterior, columns patient left->right",
        "normalization": {"method": "foreground-percentile", "percentiles": [0.5, 99.5], "range": [0, 1],
                          "png": "16-bit grayscale, value = round(x * 65535)"},
        "registration": {  # T2 onto T1 for paired subjects (shards/register.py, docs/shards.md)
            "method": options.register, "quality_check": {"max_rotation_deg": MAX_ROTATION_DEG,
                                                          "max_translation_mm": MAX_TRANSLATION_MM, "min_mask_dice": MIN_MASK_DICE},
            "subjects": {r["subject"]: {k: v for k, v in r.items() if k != "subject"}
                         for r in sorted(state["registration"], key=lambda r: r["subject"])}},
        "skipped": listing_skipped + state["skipped"],
        "timing": {"seconds": round(seconds, 2), "volumes": volumes},
    }
