"""Streaming WebDataset input for training and validation.

Training reads train/t1 and train/t2 as two independent streams (CycleGAN is unpaired). Each epoch, every
(rank, DataLoader worker) slot reads a disjoint part of the data: whole shards when there are at least as
many shards as slots, otherwise (or when --train_subjects keeps a subset) every n-th sample. No sample goes
to two ranks in one epoch. A slot cycles its part until the epoch's fixed step count is reached, so ranks never
run out at different times. The order is a function of (seed, epoch, slot), which makes the data position
exactly reproducible on resume.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import (CONTRASTS, ShardsError, check_complete, decode_png16, decode_samples, key_subject, read_manifest,
                           shard_paths)
from train.config import AUGMENT_START_LATEST, OVER_TRAINING_PASSES, Config
from train.networks import to_model_range


def read_whole(paths) -> wds.WebDataset:
    """Every sample of `paths` in order, on every rank (checks and validation; training splits its data)."""
    return wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


def check_shards(root: str, size: int | None = None, allow_partial: bool = False) -> dict:
    """Fail before training on a missing/empty folder, shards without the needed keys, a size mismatch, or val
    shards that hold fewer samples than the manifest records (a warning with `allow_partial`)."""
    if not Path(root).is_dir():
        raise ShardsError(f"--data {root}: no such folder")
    manifest = read_manifest(root)
    recorded = manifest.get("image_size")
    if not isinstance(recorded, int) or recorded < 1:
        raise ShardsError(f"{root}/manifest.json: image_size {recorded!r} is not a size in pixels")
    for stream in CONTRASTS:
        if not shard_paths(root, "train", stream):
            raise ShardsError(f"--data {root}: no train/{stream}-*.tar shards")
    for split, stream, needed in (("train", "t1", {"t1.png", "json"}), ("train", "t2", {"t2.png", "json"}),
                                  ("val", "paired", {"t1.png", "t2.png", "mask.png", "json"})):
        paths = shard_paths(root, split, stream)
        if not paths:
            if split == "val":
                raise ShardsError(f"--data {root}: no val/paired-*.tar shards; validation needs subjects with both T1 and T2")
            continue
        sample = next(iter(read_whole(paths[0])), None)
        if sample is None:
            raise ShardsError(f"{paths[0]}: empty shard")
        missing = needed - set(sample)
        if missing:
            found = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            raise ShardsError(f"{paths[0]}: samples lack {', '.join(sorted(missing))} (found {found})")
        decoded = next(decode_samples([sample]))  # a damaged PNG is a ShardsError naming the shard and key
        shape = decoded[stream if stream in CONTRASTS else "t1"].shape
        if shape != (size or recorded,) * 2:
            said = f"--size is {size}" if size else f"manifest.json's image_size is {recorded}"
            raise ShardsError(f"{paths[0]}: images are {shape[0]}x{shape[1]}, but {said}")
    val = shard_paths(root, "val", "paired")
    counted = dict.fromkeys(val, 0)
    for sample in read_whole(val):  # undecoded: a count of val's members costs little
        counted[sample["__url__"]] += 1
    check_complete(counted, allow_partial)
    return manifest


ELASTIC_CONTROL_POINTS = 7


def elastic_offsets(size: int, magnitude: float, rng: torch.Generator) -> torch.Tensor:
    """(1,size,size,2) offsets for an affine_grid (whose units span the width twice): uniform in +-`magnitude` of
    the width at a 7x7 grid of control points, bicubic between them (TorchIO's RandomElasticDeformation fits a
    B-spline to such points)."""
    control = torch.rand(1, 2, ELASTIC_CONTROL_POINTS, ELASTIC_CONTROL_POINTS, generator=rng) * 2 - 1
    return F.interpolate(control * (2 * magnitude), size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def augment(image: torch.Tensor, rng: torch.Generator, elastic: float = 0.0, intensity: bool = False) -> torch.Tensor:
    """(1,H,W) in [0,1]: left-right flip, small affine (+-5 deg, +-5% scale, +-4% shift), with `intensity` gamma
    and gain (drawn either way, so the geometry does not depend on it), and with `elastic` > 0 a smooth warp
    (elastic_offsets, --elastic) added to the affine's sampling grid, so the slice is resampled once. Intensity
    changes are multiplicative, so the air around the head stays at zero as in every shard. The slice resamples
    bicubically: bilinear resampling blurs what the discriminators see as real, and the generators learnt to
    translate that blur (single-pass texture 0.83 / 0.85 of the truth's against 0.98 / 1.00)."""
    u = torch.rand(7, generator=rng)
    if u[0] < 0.5:
        image = image.flip(-1)
    angle = math.radians((u[1].item() - 0.5) * 10)
    scale = 1 + (u[2].item() - 0.5) * 0.1
    tx, ty = (u[3].item() - 0.5) * 0.08, (u[4].item() - 0.5) * 0.08
    theta = torch.tensor([[math.cos(angle) / scale, -math.sin(angle) / scale, tx],
                          [math.sin(angle) / scale, math.cos(angle) / scale, ty]], dtype=image.dtype)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    if elastic:
        grid = grid + elastic_offsets(image.shape[-1], elastic, rng)
    image = F.grid_sample(image[None], grid, mode="bicubic", padding_mode="zeros", align_corners=False)[0]
    image = image.clamp(0, 1)
    if not intensity:
        return image
    gamma = math.exp((u[5].item() - 0.5) * 0.4)  # 0.82 .. 1.22
    gain = 0.9 + u[6].item() * 0.2
    return (image ** gamma * gain).clamp(0, 1)


@dataclass(frozen=True)
class Augmentation:
    """What a SliceStream does to its slices from training step `start` on: augment() with these options."""
    start: int = 0
    elastic: float = 0.0
    intensity: bool = False


class SliceStream(IterableDataset):
    """One contrast of train/: yields {'image': (1,H,W) in [-1,1], 'key', 'slot', 'skipped'} for the current
    epoch; `skipped` counts this slot's unreadable samples so far. With `augmentation` (None: off), samples bound
    for training steps before its start stay unaugmented (the stream knows each sample's step from
    `steps_per_epoch` and `batch_size`)."""

    def __init__(self, urls: list[str], contrast: str, seed: int, rank: int, world: int, shuffle_buffer: int, size: int, *,
                 subjects: frozenset[str] | None = None, augmentation: Augmentation | None = None, steps_per_epoch: int = 0,
                 batch_size: int = 1):
        self.urls, self.contrast, self.seed, self.size = urls, contrast, seed, size
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.subjects = subjects  # None: every subject in the shards
        self.augmentation, self.steps_per_epoch, self.batch_size = augmentation, steps_per_epoch, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + worker, self.world * workers
        urls = list(self.urls)
        random.Random(self.seed * 1000003 + self.epoch).shuffle(urls)  # same shard order on every rank
        if len(urls) >= slots and self.subjects is None:
            mine, keep = urls[slot::slots], None
        else:  # few shards, or a subset of subjects that whole shards would split unevenly: every slots-th sample
            mine, keep = urls, (slot, slots)
        seed = zlib.crc32(f"{self.seed}/{self.epoch}/{slot}/{self.contrast}".encode())  # stable across processes
        rng = torch.Generator().manual_seed(seed)
        skipped, drawn = 0, 0
        for _ in itertools.count():  # cycle this slot's part until the trainer stops asking
            yielded = 0
            samples = iter(wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples(handler=wds.warn_and_continue)))
            if self.subjects is not None:
                samples = (s for s in samples if key_subject(s["__key__"]) in self.subjects)
            if keep:
                samples = (s for i, s in enumerate(samples) if i % keep[1] == keep[0])
            for sample in wds.filters._shuffle(samples, self.shuffle_buffer, max(1, self.shuffle_buffer // 10), random.Random(seed)):
                try:
                    image = torch.from_numpy(decode_png16(sample[f"{self.contrast}.png"], self.size))[None]
                except (KeyError, ValueError, OSError) as err:
                    skipped += 1
                    print(f"warning: skipping unreadable sample {sample.get('__key__')} in {sample.get('__url__')}: {err}")
                    continue
                # a DataLoader deals whole batches to its workers in turn: this sample's step follows from its count
                step = self.epoch * self.steps_per_epoch + (drawn // self.batch_size) * workers + worker
                if self.augmentation and step >= self.augmentation.start:
                    image = augment(image, rng, self.augmentation.elastic, self.augmentation.intensity)
                yielded += 1
                drawn += 1
                yield {"image": to_model_range(image), "key": sample["__key__"], "slot": slot, "skipped": skipped}
            if yielded == 0:
                raise ShardsError(f"no readable {self.contrast} samples for data slot {slot} in {mine[:3]}...")
            seed += 1


def train_loaders(config, rank: int, world: int, *, steps_per_epoch: int, total_steps: int) -> dict[str, DataLoader]:
    """Two loaders, T1 and T2, of config.data's train shards. With config.data_url, shards are read from
    `data_url + 'train/NAME.tar'` (an http:// prefix, or pipe:COMMAND with a trailing path), still listed from
    the local manifest. `steps_per_epoch` and `total_steps` place --augment_start's first augmented step;
    config.augment must be resolved (resolve_augment), since "auto" would read as on."""
    if not isinstance(config.augment, bool):
        raise ValueError(f"--augment {config.augment}: resolve it (resolve_augment) before building the loaders")
    loaders = {}
    augmentation = Augmentation(augment_from_step(config, total_steps), config.elastic, config.augment_intensity) if config.augment else None
    subjects = training_subjects(config.data, config.train_subjects, config.seed) if config.train_subjects else None
    for index, contrast in enumerate(CONTRASTS):
        urls = shard_paths(config.data, "train", contrast)
        if config.data_url:
            urls = [f"{config.data_url}train/{Path(u).name}" for u in urls]
        stream = SliceStream(urls, contrast, config.seed * 2 + index, rank, world, config.shuffle_buffer, config.size, subjects=subjects,
                             augmentation=augmentation, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size)
        loaders[contrast] = DataLoader(stream, batch_size=config.batch_size, num_workers=config.num_workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                       multiprocessing_context="fork" if config.num_workers else None)
    return loaders


def augment_from_step(config, total_steps: int) -> int:
    """The first augmented step: --augment_start itself, below 1 that fraction of the run's steps, and auto half the
    run or AUGMENT_START_LATEST if that is sooner."""
    start = config.augment_start
    if start == "auto":
        return min(math.ceil(total_steps / 2), AUGMENT_START_LATEST)
    return math.ceil(start * total_steps if start < 1 else start)


def spelled(value: bool | float) -> str:
    """An option's value as the command line spells it: true/false, or a number."""
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def resolve_augment(manifest: dict, config, total_steps: int, world: int = 1, resumed: dict | None = None) -> tuple[bool, str | None]:
    """Whether a run of `total_steps` steps on `world` processes augments, and the lines to print about it, or None.
    --augment auto augments when the run passes over the smaller contrast's training slices more than
    OVER_TRAINING_PASSES times (a --train_subjects subset counted as its share of the subjects' slices) and goes on
    past --augment_start's step; an explicit --augment false there is warned, and so is an --elastic or
    --augment_start given where augmentation is off, or an augmentation that would never start.
    `resumed`: the configuration of the checkpoint being resumed (checkpoints.check_compatible). Its augmentation is
    what auto keeps, so that a resume with another --max_steps does not change the data halfway, and a resume that
    changes its --augment_intensity is warned."""
    train = manifest["splits"]["train"]
    slices = min(train["slices"].values()) * (config.train_subjects / len(train["subjects"]) if config.train_subjects else 1)
    passes = total_steps * config.batch_size * world / max(slices, 1)
    many = passes > OVER_TRAINING_PASSES
    start = augment_from_step(config, total_steps)
    starts = start < total_steps
    auto_augments = many and starts
    augment, note, resumed_augment = config.augment, None, (resumed or {}).get("augment")
    if config.augment == "auto" and isinstance(resumed_augment, bool):
        augment, note = resumed_augment, (
            f"augmentation {'on' if resumed_augment else 'off'} (--augment auto), as in the run resumed; "
            f"--augment {spelled(not resumed_augment)} would change it" if resumed_augment != auto_augments else None)
    elif config.augment == "auto":
        augment = auto_augments
        if many:
            note = (f"augmentation {'on' if starts else 'off'} (--augment auto): this run passes over its training slices "
                    f"about {passes:.0f} times, more than {OVER_TRAINING_PASSES}")
            if not starts:
                note += (f", but it ends by step {start}, where augmentation would start (--augment_start): augmentation "
                         f"begun sooner keeps the contrast from being learnt")
    elif auto_augments and not config.augment:
        note = (f"warning: this run passes over its training slices about {passes:.0f} times with --augment false; on "
                f"a small training set the default recipe then over-trains and its single pass speckles "
                f"(docs/fidelity.md, \"Small data, trained long\"); --augment auto would augment")
    lines = [note] if note else []
    if augment and start:
        lines.append(f"augmentation starts at step {start} of {total_steps} (--augment_start)" if starts else
                     f"warning: augmentation never starts: --augment_start puts it at step {start}, and this run ends at "
                     f"step {total_steps}")
    if augment and resumed_augment is True and resumed["augment_intensity"] != config.augment_intensity:
        lines.append(f"warning: the run resumed augmented with --augment_intensity {spelled(resumed['augment_intensity'])}; "
                     f"going on with {spelled(config.augment_intensity)} changes its data halfway")
    defaults = Config.defaults()
    lines += [f"warning: --{name} {spelled(getattr(config, name))} does nothing: augmentation is off for this run (--augment)"
              for name in ("elastic", "augment_start", "augment_intensity") if not augment and getattr(config, name) != defaults[name]]
    return augment, "\n".join(lines) or None


def training_subjects(root: str, count: int, seed: int) -> frozenset[str]:
    """`count` of the manifest's training subjects, drawn by `seed`: the same ones on every rank and resume."""
    listed = sorted(read_manifest(root)["splits"]["train"]["subjects"])
    if count > len(listed):
        raise ShardsError(f"--train_subjects {count}: {root} has only {len(listed)} training subjects")
    return frozenset(random.Random(seed).sample(listed, count))


def val_samples(root: str, split: str = "val", limit: int | None = None) -> list[dict]:
    """Decoded paired samples of a split, in shard order (small: val/test are 10% of subjects)."""
    paths = shard_paths(root, split, "paired")
    if not paths:
        return []
    return list(decode_samples(itertools.islice(read_whole(paths), limit)))


def evenly_spaced(samples: list, count: int) -> list:
    """`count` samples spread over the list: a fixed, representative subset."""
    if len(samples) <= count:
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]
