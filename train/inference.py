"""Load a checkpoint's generators for inference and translate [0,1] slices. Used by validation tests,
train.translate, train.evaluate and the dashboard; only .safetensors are read, nothing is unpickled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from shards.preprocess import Grid, from_image, resample, standardize, standardize_image, to_image, unfit_image
from train import rundir
from train.networks import GeneratorSpec, flip_shift, from_model_range, to_model_range, unflip_shift

SPELLINGS = {d.replace("_", "-"): d for d in rundir.DIRECTIONS}  # the CLI's t1-to-t2


class CheckpointError(ValueError):
    pass


def read_checkpoint_info(checkpoint: Path) -> dict:
    path = Path(checkpoint) / rundir.CHECKPOINT_INFO
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint folder (no {rundir.CHECKPOINT_INFO}); "
                              f"expected RUN/checkpoints/step-NNNNNNN")
    try:
        info = rundir.parse_json(path.read_text())
        info["generator"] = GeneratorSpec.from_dict(info["generator"])
        info["preprocessing"]["fov_mm"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint description ({type(err).__name__}: {err})") from None
    return info


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or for a run folder its best checkpoint (by val SSIM; else the newest)."""
    path = Path(path)
    if (path / rundir.CHECKPOINT_INFO).is_file() or not (path / rundir.CHECKPOINTS).is_dir():
        return path
    found = dict(rundir.list_checkpoints(path))
    if not found:
        raise CheckpointError(f"{path}: a run folder without checkpoints")
    try:
        best = (rundir.read_summary(path) or {}).get("best_checkpoint_step")
    except (OSError, ValueError):
        best = None
    return found.get(best, found[max(found)])


def load_generator(checkpoint: Path, direction: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """direction: 't1_to_t2' or 't2_to_t1' (or the CLI spelling 't1-to-t2'). Returns (network in eval mode, info)."""
    direction = SPELLINGS.get(direction, direction)
    if direction not in rundir.GENERATORS:
        raise CheckpointError(f"unknown direction {direction!r}: choose t1-to-t2 or t2-to-t1")
    checkpoint = resolve_checkpoint(checkpoint)
    info = read_checkpoint_info(checkpoint)
    info["path"] = str(checkpoint)
    weights = Path(checkpoint) / rundir.GENERATORS[direction]
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint}: no {weights.name}")
    net = info["generator"].build()
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights}: cannot load the generator ({err})") from None
    return net.to(device).eval(), info


def load_translator(checkpoints: list[Path], direction: str, device: str | torch.device = "cpu", tta: bool = False
                    ) -> tuple[Translator, dict]:
    """One checkpoint's generator, or several checkpoints' as a deep ensemble, as a Translator. Returns it and the
    first checkpoint's info, with `members`: every checkpoint's path when there are several."""
    loaded = [load_generator(checkpoint, direction, device) for checkpoint in checkpoints]
    first = loaded[0][1]
    paths = [info["path"] for _, info in loaded]
    repeated = next((path for i, path in enumerate(paths) if path in paths[:i]), None)
    if repeated:
        raise CheckpointError(f"{repeated}: given twice; an ensemble's members are different checkpoints")
    for _, info in loaded[1:]:
        if info["preprocessing"] != first["preprocessing"]:
            raise CheckpointError(f"{info['path']}: preprocessing {info['preprocessing']} differs from {first['path']}'s "
                                  f"{first['preprocessing']}; an ensemble's members must be trained on the same grid")
    return Translator([net for net, _ in loaded], tta), {**first, **({"members": paths} if len(paths) > 1 else {})}


@torch.no_grad()
def translate(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """[0,1] slices (N,1,H,W) -> [0,1] translations; the network (or Translator.copies) works in [-1,1]."""
    return from_model_range(net(to_model_range(images)))


# test-time augmentation: each copy of the input is shifted by (rows, cols) pixels, with and without a left-right flip
TTA_SHIFTS = ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))
TTA_HELP = "translate as the mean of 10 flipped and shifted copies (test-time augmentation; 10x the compute)"
ENSEMBLE_HELP = ("several (independently trained runs of the same size): translate as the mean of their "
                 "translations (a deep ensemble; compute times their number)")


class Translator(nn.Module):
    """One direction of a trained model as it is used: one generator, or the generators of independently trained
    runs (a deep ensemble, Lakshminarayanan et al. 2017: the translation is the mean of theirs), in one pass or,
    with `tta`, on 10 flipped and shifted copies of the input, each translation moved back and averaged. Texture
    a generator invents differs from copy to copy and averages out; anatomy does not. Works in the generators'
    [-1,1] like a generator (`translate` for [0,1] slices). The model-use layer: callers ask it, never unwrap it."""

    def __init__(self, members: list[nn.Module], tta: bool = False):
        super().__init__()
        self.members, self.tta = nn.ModuleList(members), tta

    def averaged(self) -> Translator:
        """The same members on the 10 copies (the copies whose spread is the tta hallucination map)."""
        return Translator(list(self.members), tta=True)

    def single_pass(self) -> Translator:
        return Translator(list(self.members), tta=False)

    @property
    def scale_head(self) -> bool:
        """True when this is one generator with a scale head (a run trained with --lambda_aleatoric)."""
        return len(self.members) == 1 and getattr(self.members[0], "scale_head", False)

    def copies(self, x: torch.Tensor, with_scale: bool = False) -> torch.Tensor:
        """(N,C,H,W) in [-1,1] -> (K,N,C',H,W): each member's translation, or with tta each member's 10 copies'
        (K = members x 10). `with_scale`: the scale head's output too (C' = 2C; see scale_head)."""
        if with_scale and not self.scale_head:
            raise ValueError("with_scale needs one generator with a scale head")
        out = []
        for member in self.members:
            through = member.with_scale if with_scale else member
            if not self.tta:
                out.append(through(x)[None])
                continue
            out.append(torch.stack([unflip_shift(through(flip_shift(x, flip, shift)), flip, shift)
                                    for flip in (False, True) for shift in TTA_SHIFTS]))
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0](x) if len(self.members) == 1 and not self.tta else self.copies(x).mean(0)

    def with_scale(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,2C,H,W): the translation and its Laplace scale (with tta, the copies' means)."""
        return self.copies(x, with_scale=True).mean(0)


def device_for_inference() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# (B,1,H,W) [0,1] slices -> named (B,1,H,W) outputs: a translation, and maybe its hallucination map
SliceFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def apply_to_slices(fn: SliceFn, slices: np.ndarray, device: torch.device, batch_size: int = 8,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """(N, H, W) [0,1] float32 -> each of `fn`'s outputs as (N, H, W), in batches on `device`."""
    out = {}
    for start in tqdm(range(0, len(slices), batch_size), disable=not progress, desc="slices", unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None].to(device)
        for name, result in fn(batch).items():
            out.setdefault(name, np.empty_like(slices, dtype=np.float32))[start:start + batch_size] = result[:, 0].float().cpu().numpy()
    return out


def translation_only(net: nn.Module) -> SliceFn:
    return lambda images: {"translation": translate(net, images)}


def translate_slices(net: nn.Module, slices: np.ndarray, batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """(N, H, W) [0,1] float32 -> (N, H, W) translations, in batches on the network's device."""
    return apply_to_slices(translation_only(net), slices, next(net.parameters()).device, batch_size, progress)["translation"]


@dataclass
class PreparedVolume:
    """A volume on the training grid: `images` are the axial slices with head, as the model sees them."""

    grid: Grid
    planes: np.ndarray  # grid z index of each image
    images: np.ndarray  # (N, size, size) in [0,1], image orientation (anterior up, left on the left)
    mask: np.ndarray  # head mask on the grid
    image_masks: np.ndarray  # (N, size, size) the head mask of each image, in the images' orientation


def prepare_volume(data: np.ndarray, affine: np.ndarray, preprocessing: dict) -> PreparedVolume:
    """Exactly what `shards pack` did to the checkpoint's training volumes (shards.preprocess.standardize)."""
    grid, normalized, mask, _ = standardize(data, affine, preprocessing["size"], preprocessing["fov_mm"],
                                            preprocessing.get("bias_correction", "none"))
    planes = np.flatnonzero(mask.any(axis=(0, 1)))
    return PreparedVolume(grid, planes, np.stack([to_image(normalized[:, :, z]) for z in planes]), mask,
                          np.stack([to_image(mask[:, :, z]) for z in planes]))


def restore_volume(prepared: PreparedVolume, translated: np.ndarray, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """Translated slices back onto the input's voxel grid (0 outside the head), in [0,1]."""
    on_grid = np.zeros(prepared.grid.shape, np.float32)
    for z, image in zip(prepared.planes, translated):
        on_grid[:, :, z] = from_image(image) * prepared.mask[:, :, z]
    return np.clip(resample(on_grid, prepared.grid.affine, Grid(tuple(shape), affine)), 0.0, 1.0)


def volume_outputs(fn: SliceFn, data: np.ndarray, affine: np.ndarray, preprocessing: dict,
                   device: torch.device, batch_size: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
    """A 3D volume in any orientation -> each of `fn`'s outputs (a translation, a hallucination map) on the
    input's voxel grid: prepared as the training data was, run slice by slice where there is head, resampled back."""
    prepared = prepare_volume(data, affine, preprocessing)
    return {name: restore_volume(prepared, slices, data.shape, affine)
            for name, slices in apply_to_slices(fn, prepared.images, device, batch_size, progress).items()}


def translate_volume(net: nn.Module, data: np.ndarray, affine: np.ndarray, preprocessing: dict, batch_size: int = 8,
                     progress: bool = False) -> np.ndarray:
    """A 3D volume -> its translation on the same voxel grid, in [0,1]."""
    device = next(net.parameters()).device
    return volume_outputs(translation_only(net), data, affine, preprocessing, device, batch_size, progress)["translation"]


def image_outputs(fn: SliceFn, image: np.ndarray, size: int, device: torch.device) -> dict[str, np.ndarray]:
    """A 2D image of any size (already read as float) -> each of `fn`'s outputs at the input's size."""
    normalized, mask, _ = standardize_image(image, size)
    return {name: unfit_image(slices[0] * mask, image.shape) for name, slices in apply_to_slices(fn, normalized[None], device).items()}
