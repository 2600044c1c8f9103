"""Fidelity: where a translation may invent or erase anatomy, and whether known lesions survive it.

Hallucination maps (one per translation, same size, intensity units of the [0,1] image):
  tta       spread (std) of the translations of flipped and shifted copies of the input, each moved back;
            where the model is sure, the copies agree (test-time augmentation, Wang et al. 2019). For an
            ensemble of checkpoints, the spread of every member's copies together.
  cycle     |F(G(x)) - x|: what the way back cannot recover was not carried through the translation.
  ensemble  spread across the checkpoints given, or for one checkpoint across its run's kept checkpoints
            (needs a run folder with at least two).
  aleatoric the generator's own estimate of its error, E|error| from its scale head (a run trained with
            --lambda_aleatoric); with --tta, the mean of the copies' estimates.

Lesion metrics compare each lesion (a 3D connected component of a subject's lesion mask) with the
normal-appearing tissue in a ring around it (2 pixels wide, inside the head): contrast = (lesion mean -
ring mean) / ring mean, in the translation and in the ground truth. A lesion counts as visible when its
translated contrast has the sign of the true one and at least half its size. Where there is a hallucination
map, a lesion counts as flagged when the map's mean over it is above 90% of the head's pixels (its map rank
>= 0.9): the map warns where it matters most, at a lesion the translation may have lost.

Noise transfer (noise_transfer) asks what a model does with the input's own noise: how much of it a
translation passes on, and how much its cycle brings back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchmetrics.classification import BinaryAUROC

from train import rundir
from train.data import val_samples
from train.inference import SPELLINGS, CheckpointError, Translator, load_generator, load_translator, resolve_checkpoint, translate
from train.networks import from_model_range, to_model_range

MODES = ("tta", "cycle", "ensemble", "aleatoric")
RING_PIXELS = 2
VISIBLE_FRACTION = 0.5
FLAGGED_RANK = 0.9
# AUROC thresholds: fine where maps concentrate (small spreads), coarse above
AUROC_THRESHOLDS = torch.cat([torch.linspace(0, 0.1, 501), torch.linspace(0.1, 1, 181)[1:]])


class HallucinationMap:
    """A translator's hallucination map of one mode: called with [0,1] slices, gives their translation and its map.
    `checkpoints` (or a run folder, for its best checkpoint) are what the translator was loaded from: the cycle
    mode loads their reverse direction unless `back` is given, and the ensemble mode of one checkpoint loads
    its run's kept checkpoints."""

    def __init__(self, mode: str, translator: Translator, checkpoints: Path | list[Path], direction: str,
                 device: torch.device | str = "cpu", back: Translator | None = None):
        if mode not in MODES:
            raise CheckpointError(f"unknown uncertainty mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.translator = mode, translator
        direction = SPELLINGS.get(direction, direction)  # the CLI spelling t1-to-t2 too
        checkpoints = [resolve_checkpoint(path) for path in (checkpoints if isinstance(checkpoints, list) else [checkpoints])]
        checkpoint = checkpoints[0]
        if mode == "tta":
            self.spread_of = translator.averaged()
        elif mode == "cycle":
            self.back = back or load_translator(checkpoints, rundir.REVERSE[direction], device, translator.tta)[0]
        elif mode == "ensemble":
            if len(translator.members) > 1:
                self.spread_of = translator.single_pass()
                return
            run = Path(checkpoint).parent.parent
            kept = [path for _, path in rundir.list_checkpoints(run)]
            if len(kept) < 2:
                raise CheckpointError(f"{checkpoint}: uncertainty mode 'ensemble' needs a run folder with at least two "
                                      f"kept checkpoints ({run} has {len(kept)}) or more checkpoints as members; use tta or cycle")
            self.spread_of = load_translator(kept, direction, device)[0]
        elif len(translator.members) > 1:
            raise CheckpointError(f"{checkpoint} and {len(translator.members) - 1} more: uncertainty mode 'aleatoric' reads one "
                                  f"checkpoint's scale heads, not an ensemble's; use tta, cycle or ensemble")
        elif not translator.scale_head:
            raise CheckpointError(f"{checkpoint}: uncertainty mode 'aleatoric' needs a run trained with --lambda_aleatoric "
                                  f"(its generators have no scale head); use tta, cycle or ensemble")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0,1] images (N,1,H,W) -> (their translation, the map). Where the translator averages the copies that
        the tta map spreads (--tta), they run once: their mean is the translation, their std the map."""
        if self.mode == "aleatoric":
            translation, scale = self.translator.with_scale(to_model_range(images)).float().chunk(2, 1)
            return from_model_range(translation), scale / 2  # the scale in the [0,1] image's units
        if self.mode == "tta" and self.translator.tta:
            copies = translate(self.translator.copies, images)
            return copies.mean(0), copies.std(0)
        translated = translate(self.translator, images)
        if self.mode == "cycle":
            return translated, (translate(self.back, translated) - images).abs()
        return translated, translate(self.spread_of.copies, images).std(0)


@torch.no_grad()
def noise_transfer(forward: nn.Module, back: nn.Module, images: torch.Tensor, mask: torch.Tensor, std: float = 0.01,
                   seed: int = 0) -> dict[str, float]:
    """What a translation does with noise that the input has and the anatomy does not. Adds Gaussian noise of
    `std` to [0,1] `images` (N,1,H,W) and compares, inside `mask`, each output with and without it:
      passed    the translation's change, RMS over the noise's: 0 ignores the noise, a per-pixel intensity
                mapping passes it at its slope;
      returned  the share of the noise that comes back through the cycle F(G(x)) (regression coefficient):
                1 is all of it, as for a per-pixel mapping and its inverse.
    A translation that passes little visibly but returns much has hidden the input's noise in a faint pattern
    the way back decodes (CycleGAN steganography, Chu et al. 2017): the speckle --cycle_noise is against."""
    noise = std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    inside = mask.bool()
    translated, translated_noisy = translate(forward, images), translate(forward, images + noise)
    change = (translate(back, translated_noisy) - translate(back, translated))[inside]
    noise = noise[inside]
    return {"passed": float((translated_noisy - translated)[inside].square().mean().sqrt() / noise.square().mean().sqrt()),
            "returned": float((change * noise).sum() / noise.square().sum())}


def translate_with_map(translator: Translator, images: torch.Tensor,
                       hallucination: HallucinationMap | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[0,1] images -> (their translation, its hallucination map, or None without one)."""
    return hallucination(images) if hallucination is not None else (translate(translator, images), None)


class ErrorDetection:
    """Streaming AUROC of a hallucination map as a detector of pixels whose |error| exceeds a threshold,
    inside the head mask (binned, so memory does not grow with the test set)."""

    def __init__(self, error_threshold: float):
        self.error_threshold = error_threshold
        self.auroc = BinaryAUROC(thresholds=AUROC_THRESHOLDS)
        self.positives = self.pixels = 0

    def update(self, uncertainty: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        inside = mask.bool()
        large = ((pred - target).abs() > self.error_threshold)[inside]
        self.auroc.update(uncertainty[inside].float().clamp(0, 1).cpu(), large.long().cpu())
        self.positives += int(large.sum())
        self.pixels += int(inside.sum())

    def result(self) -> dict:
        both = 0 < self.positives < self.pixels  # AUROC is undefined with one class only
        return {"auroc": float(self.auroc.compute()) if both else None,
                "large_error_fraction": self.positives / max(self.pixels, 1)}


def lesion_contrasts(lesion: np.ndarray, head: np.ndarray, images: dict[str, np.ndarray],
                     uncertainty: np.ndarray | None = None) -> list[dict]:
    """Per lesion of one subject: its size and, per image, the lesion-to-ring contrast and lesion mean; with an
    `uncertainty` map, the fraction of head pixels whose map is below the lesion's mean (its map rank).
    lesion, head: (Z,H,W) bool, consecutive slices; images, uncertainty: (Z,H,W) float."""
    head_map = np.sort(uncertainty[head]) if uncertainty is not None else None
    labels, count = ndimage.label(lesion)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    out = []
    for index, bounds in enumerate(ndimage.find_objects(labels), start=1):
        pad = tuple(slice(max(s.start - (RING_PIXELS if i else 0), 0), s.stop + (RING_PIXELS if i else 0))
                    for i, s in enumerate(bounds))
        inside = labels[pad] == index
        ring = ndimage.binary_dilation(inside, in_plane, iterations=RING_PIXELS) & ~lesion[pad] & head[pad]
        if not ring.any():
            continue
        row = {"pixels": int(inside.sum())}
        for name, image in images.items():
            core, around = image[pad][inside].mean(), image[pad][ring].mean()
            row[name] = {"contrast": float((core - around) / max(around, 1e-3)), "mean": float(core)}
        if head_map is not None:
            row["map_rank"] = float(np.searchsorted(head_map, uncertainty[pad][inside].mean()) / len(head_map))
        out.append(row)
    return out


def lesion_summary(lesions: list[dict], abs_errors: list[np.ndarray]) -> dict:
    """Direction-level lesion metrics from lesion_contrasts rows (images 'pred' and 'truth', maybe map ranks)
    and the |error| of every lesion pixel."""
    truth = np.array([r["truth"]["contrast"] for r in lesions])
    pred = np.array([r["pred"]["contrast"] for r in lesions])
    visible = (np.sign(pred) == np.sign(truth)) & (np.abs(pred) >= VISIBLE_FRACTION * np.abs(truth))
    errors = np.concatenate(abs_errors) if abs_errors else np.zeros(0)
    summary = {"lesions": len(lesions), "visible_fraction": float(visible.mean()),
               "contrast_truth": float(truth.mean()), "contrast_translation": float(pred.mean()),
               "contrast_ratio": float(pred.mean() / truth.mean()), "mae_lesion": float(errors.mean()) if errors.size else None}
    if all("map_rank" in r for r in lesions):
        rank = np.array([r["map_rank"] for r in lesions])
        flagged = rank >= FLAGGED_RANK
        summary.update({"map_rank": float(rank.mean()), "flagged_fraction": float(flagged.mean()),
                        "lost_flagged_fraction": float(flagged[~visible].mean()) if (~visible).any() else None})
    return summary


def stack_subject(slices: list[dict]) -> dict[str, np.ndarray]:
    """A subject's paired slices (dicts with 'z' and arrays) -> (Z,H,W) arrays in slice order. Gaps in z
    (slices pack left out) get empty planes, so lesions never join across them."""
    slices = sorted(slices, key=lambda s: s["z"])
    z0, z1 = slices[0]["z"], slices[-1]["z"]
    shape = slices[0]["lesion"].shape
    out = {k: np.zeros((z1 - z0 + 1, *shape), slices[0][k].dtype) for k in slices[0] if k != "z"}
    for s in slices:
        for k in out:
            out[k][s["z"] - z0] = s[k]
    return out


def tissue_contrast(checkpoint: Path, shards: Path) -> dict[str, float]:
    """Per direction, how much of the truth's tissue contrast a checkpoint's translation of the shards' val and
    test slices keeps: its mean over the truth's brightest tenth of head pixels minus its mean over the darkest
    tenth (CSF against white matter in T2, the reverse in T1), over the same for the truth. 1 keeps it, 0
    flattens it, below 0 inverts it: the failure of the seed's settings on a real brain (docs/fidelity.md)."""
    samples = val_samples(str(shards), "val") + val_samples(str(shards), "test")
    images = {k: torch.from_numpy(np.stack([s[k] for s in samples]))[:, None] for k in ("t1", "t2", "mask")}
    kept = {}
    for direction, (source, target) in rundir.DIRECTIONS.items():
        net, _ = load_generator(checkpoint, direction)
        with torch.no_grad():
            pred, truth = translate(net, images[source])[images["mask"]], images[target][images["mask"]]
        bright, dark = truth >= truth.quantile(0.9), truth <= truth.quantile(0.1)
        kept[direction] = float((pred[bright].mean() - pred[dark].mean()) / (truth[bright].mean() - truth[dark].mean()))
    return kept
