"""The fidelity test set (lesions, held-out anatomy), hallucination maps and lesion metrics (docs/fidelity.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scipy import ndimage

from conftest import ROOT, SMALL, run_module, train
from shards.format import decode_sample, read_manifest, shard_paths
from shards.pack import assign_splits
from shards.preprocess import Grid, load_nifti, resample
from shards.phantom import CSF, tissue_labels, voxel_world
from shards.synth import MIN_SUBJECTS_FOR_HOLDOUT, grid, mark_held_out, render_subject, subject_anatomy, subjects
from train import rundir
from train.metrics import slice_metrics
from train.scoring import read_samples, split_shards
from train.fidelity import ErrorDetection, HallucinationMap, lesion_contrasts, lesion_summary, noise_transfer
from train.inference import CheckpointError, Translator, load_generator, load_translator, resolve_checkpoint, translate


@pytest.fixture(scope="module")
def fidelity_tars(tmp_path_factory):
    out = tmp_path_factory.mktemp("ixi-fidelity")
    run_module("shards", "synth", "--out", out, "--subjects", 12, "--seed", 3, "--downsample", 4, "--lesions", "--holdout-anatomy")
    return out


@pytest.fixture(scope="module")
def fidelity_shards(fidelity_tars, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards-fidelity") / "s64"
    run_module("shards", "pack", "--t1", fidelity_tars / "IXI-T1.tar", "--t2", fidelity_tars / "IXI-T2.tar", "--out", out,
               "--size", 64, "--workers", 2, "--lesions", fidelity_tars / "IXI-lesions.tar", "--holdout", fidelity_tars / "holdout.txt")
    return out


def held_out_ids(tars) -> dict[str, str]:
    lines = [line.split("#") for line in (tars / "holdout.txt").read_text().splitlines() if not line.startswith("#")]
    return {ident.strip(): note.strip() for ident, note in lines}


def lesion_and_ring_contrast(image: np.ndarray, lesion: np.ndarray) -> float:
    rows = lesion_contrasts(lesion, image > 0.05 * image.max(), {"image": image})
    return float(np.mean([r["image"]["contrast"] for r in rows]))


def test_lesions_are_dark_on_t1_bright_on_t2_with_a_mask_on_the_t2_grid():
    table = mark_held_out(subjects(12, seed=3), seed=3, lesions=True, holdout_anatomy=False)
    subject = next(s for s in table if s.lesions)
    volumes = render_subject(subject, seed=3, downsample=4)
    t1, t1_affine, _ = load_nifti(volumes["T1"])
    t2, t2_affine, _ = load_nifti(volumes["T2"])
    mask, mask_affine, _ = load_nifti(volumes["lesion"])
    assert mask.shape == t2.shape and np.allclose(mask_affine, t2_affine) and mask.sum() > 5
    assert lesion_and_ring_contrast(t2, mask > 0) > 0.3, "lesions are hyperintense on T2"
    # the T1 grid differs: carry the mask into T1 space through world coordinates
    mask_t1 = resample((mask > 0).astype(np.float32), mask_affine, Grid(t1.shape, t1_affine)) >= 0.5
    assert lesion_and_ring_contrast(t1, mask_t1) < -0.2, "and hypointense on T1"
    # everything but the lesions is the same subject: the lesion stream is separate
    plain = render_subject(replace(subject, lesions=0), seed=3, downsample=4)
    plain_t2, _, _ = load_nifti(plain["T2"])
    outside = ~ndimage.binary_dilation(mask > 0, np.ones((3, 3, 3)), iterations=2)  # the partial-volume blur reaches 2 voxels
    assert np.abs(plain_t2 - t2)[outside].max() == 0 and "lesion" not in plain


def test_held_out_anatomy_has_enlarged_ventricles():
    table = mark_held_out(subjects(20, seed=5), seed=5, lesions=False, holdout_anatomy=True)
    subject = next(s for s in table if s.variant)
    assert subject.variant == "enlarged-ventricles" and not any(s.lesions for s in table)
    anatomy = lambda s: subject_anatomy(s, np.random.default_rng([5, s.number]), seed=5)  # noqa: E731
    assert anatomy(subject).ventricle_scale >= 2.0 > 1.5 >= max(anatomy(s).ventricle_scale for s in table if not s.variant)
    # the ventricles (CSF in a box around them) grow; nothing else about the subject changes
    shape, affine = grid("T2", 4)
    world = voxel_world(shape, affine, slice(None))
    box = (np.abs(world[..., 0]) < 30) & (np.abs(world[..., 1]) < 45) & (world[..., 2] > 0) & (world[..., 2] < 40)
    csf = lambda a: ((tissue_labels(world, a) == CSF) & box).sum()  # noqa: E731
    assert csf(anatomy(subject)) > 1.5 * csf(anatomy(replace(subject, variant=None)))


def test_synth_writes_masks_and_the_holdout_list(fidelity_tars):
    held = held_out_ids(fidelity_tars)
    assert sum("lesions" in note for note in held.values()) == 1 and sum(n == "enlarged-ventricles" for n in held.values()) == 1
    with tarfile.open(fidelity_tars / "IXI-lesions.tar") as tar:
        names = tar.getnames()
    lesion_subject = next(i for i, n in held.items() if "lesions" in n)
    assert len(names) == 1 and names[0].startswith(lesion_subject) and names[0].endswith("-lesion.nii.gz")


def test_too_few_subjects_for_lesions_is_a_clear_error(tmp_path):
    result = run_module("shards", "synth", "--out", tmp_path / "x", "--subjects", MIN_SUBJECTS_FOR_HOLDOUT - 1, "--lesions", check=False)
    assert result.returncode == 1 and "--lesions needs --subjects >= 10" in result.stderr
    assert not (tmp_path / "x").exists(), "nothing is written"


def test_held_out_subjects_never_train_and_lesion_masks_travel_with_their_slices(fidelity_tars, fidelity_shards):
    manifest = read_manifest(fidelity_shards)
    held = set(held_out_ids(fidelity_tars))
    assert set(manifest["held_out"]["subjects"]) == held
    assert not held & set(manifest["splits"]["train"]["subjects"])
    assert held <= set(manifest["splits"]["val"]["subjects"]) | set(manifest["splits"]["test"]["subjects"])
    lesion_subject = manifest["held_out"]["lesion_masks"][0]
    lesion_pixels = 0
    for split in ("val", "test"):
        for raw in wds.WebDataset(shard_paths(fidelity_shards, split, "paired"), shardshuffle=False, nodesplitter=None, workersplitter=None):
            sample = decode_sample(raw)
            assert ("lesion" in sample) == (sample["meta"]["subject"] == lesion_subject)
            if "lesion" in sample:
                lesion_pixels += int(sample["lesion"].sum())
                assert not (sample["lesion"] & ~sample["mask"]).any(), "lesions lie inside the head"
    assert lesion_pixels > 5


def test_split_puts_held_out_subjects_in_val_and_test_and_is_unchanged_without_them():
    refs = {f"S{i:02d}": object() for i in range(20)}
    plain = assign_splits(refs, refs, (0.8, 0.1, 0.1), seed=0)
    assert plain == assign_splits(refs, refs, (0.8, 0.1, 0.1), seed=0, held_out=frozenset())
    held = frozenset(["S03", "S07", "S11"])
    split = assign_splits(refs, refs, (0.8, 0.1, 0.1), seed=0, held_out=held)
    assert not held & set(split["train"]) and held <= set(split["val"]) | set(split["test"])
    assert len(split["train"]) == 20 - len(split["val"]) - len(split["test"])


def test_lesion_contrast_visibility_and_error_on_known_images():
    truth = np.full((3, 20, 20), 0.5, np.float32)
    lesion = np.zeros_like(truth, bool)
    lesion[1, 4:7, 4:7] = True  # lesion A
    lesion[:, 12:15, 12:15] = True  # lesion B spans three slices: one 3D component
    truth[lesion] = 1.0  # contrast +1 against the 0.5 ring
    erased = truth.copy()
    erased[1, 4:7, 4:7] = 0.5  # A erased, B kept at +0.6
    erased[:, 12:15, 12:15] = 0.8
    head = np.ones_like(lesion)
    rows = lesion_contrasts(lesion, head, {"pred": erased, "truth": truth})
    assert len(rows) == 2 and sorted(r["pixels"] for r in rows) == [9, 27]
    summary = lesion_summary(rows, [np.abs(erased - truth)[lesion]])
    assert summary["lesions"] == 2 and summary["visible_fraction"] == 0.5
    assert summary["contrast_truth"] == pytest.approx(1.0) and summary["contrast_translation"] == pytest.approx(0.3)
    assert summary["contrast_ratio"] == pytest.approx(0.3)
    assert summary["mae_lesion"] == pytest.approx((9 * 0.5 + 27 * 0.2) / 36)
    assert "flagged_fraction" not in summary  # no map, no flags


def test_a_map_that_stands_out_at_a_lesion_flags_it():
    truth = np.full((3, 20, 20), 0.5, np.float32)
    lesion = np.zeros_like(truth, bool)
    lesion[1, 4:7, 4:7] = True  # A: erased, and the map is high there
    lesion[:, 12:15, 12:15] = True  # B: kept, and the map is as low as anywhere
    truth[lesion] = 1.0
    pred = truth.copy()
    pred[1, 4:7, 4:7] = 0.5
    uncertainty = np.random.default_rng(0).uniform(0, 0.01, truth.shape).astype(np.float32)
    uncertainty[1, 4:7, 4:7] = 0.2
    rows = lesion_contrasts(lesion, np.ones_like(lesion), {"pred": pred, "truth": truth}, uncertainty)
    ranks = sorted(r["map_rank"] for r in rows)
    assert ranks[0] < 0.9 and ranks[1] == pytest.approx(1 - 9 / lesion.size)  # A's 9 pixels are the map's top ones
    summary = lesion_summary(rows, [np.abs(pred - truth)[lesion]])
    assert summary["flagged_fraction"] == 0.5 and summary["lost_flagged_fraction"] == 1.0
    assert summary["map_rank"] == pytest.approx(sum(ranks) / 2)


class Projected(torch.nn.Module):
    """Keeps an image's 2x2 block means and multiplies what is left (the finer detail) by `detail`: a smoothing
    translation at 0, the identity at 1. With 1/detail it undoes `detail` exactly: the block means are a projection."""

    def __init__(self, detail: float):
        super().__init__()
        self.detail = detail

    def forward(self, x):
        coarse = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
        return coarse + self.detail * (x - coarse)


def test_noise_transfer_tells_a_translation_that_hides_the_input_noise_from_one_that_drops_it():
    """Two cycles that look alike on the way out (the 2x2 block means of the noise, plus 5% of the rest: half its
    RMS) differ on the way back: one decodes the faint rest into all of the input's noise, the other cannot."""
    images = 0.3 + 0.4 * torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(images, dtype=torch.bool)
    assert noise_transfer(Projected(1.0), Projected(1.0), images, mask) == pytest.approx({"passed": 1.0, "returned": 1.0}, abs=1e-3)
    hiding = noise_transfer(Projected(0.05), Projected(20.0), images, mask)
    dropping = noise_transfer(Projected(0.05), Projected(1.0), images, mask)
    assert hiding["passed"] == pytest.approx(dropping["passed"], abs=1e-6)
    assert hiding["passed"] == pytest.approx((0.25 + 0.75 * 0.05**2) ** 0.5, abs=0.02)  # a white noise's block means: 1/4 of its power
    assert hiding["returned"] == pytest.approx(1.0, abs=1e-3)
    assert dropping["returned"] == pytest.approx(0.25 + 0.75 * 0.05, abs=0.03)


def test_error_detection_auroc():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.uniform(size=(4, 1, 16, 16)).astype(np.float32))
    pred = target + torch.from_numpy(rng.normal(scale=0.1, size=target.shape).astype(np.float32))
    mask = torch.ones_like(target, dtype=torch.bool)
    perfect, blind = ErrorDetection(0.1), ErrorDetection(0.1)
    perfect.update((pred - target).abs(), pred, target, mask)
    blind.update(torch.rand(target.shape), pred, target, mask)
    assert perfect.result()["auroc"] > 0.99 and 0.4 < blind.result()["auroc"] < 0.6
    assert 0.2 < perfect.result()["large_error_fraction"] < 0.5
    one_class = ErrorDetection(10.0)
    one_class.update(torch.rand(target.shape), pred, target, mask)
    assert one_class.result()["auroc"] is None


class Counted(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0
        self.scale_head = getattr(net, "scale_head", False)

    def forward(self, x):
        self.calls += 1
        return self.net(x)

    def with_scale(self, x):
        self.calls += 1
        return self.net.with_scale(x)


def test_hallucination_maps(trained):
    checkpoint = resolve_checkpoint(trained)
    images = torch.rand(2, 1, 64, 64)
    net, _ = load_generator(checkpoint, "t1_to_t2")
    back, _ = load_generator(checkpoint, "t2_to_t1")
    translator = Translator([net])
    translated, cycle = HallucinationMap("cycle", translator, checkpoint, "t1_to_t2")(images)
    assert torch.equal(translated, translate(net, images))
    assert torch.allclose(cycle, (translate(back, translated) - images).abs())
    _, tta = HallucinationMap("tta", translator, checkpoint, "t1_to_t2")(images)
    assert tta.shape == images.shape and tta.min() >= 0 and tta.max() > 0
    _, ensemble = HallucinationMap("ensemble", translator, trained, "t1_to_t2")(images)  # the run keeps two checkpoints
    assert ensemble.shape == images.shape and ensemble.max() > 0
    # a way back the caller holds is the one used, not loaded again
    identity = Translator([torch.nn.Identity()])
    held = HallucinationMap("cycle", identity, checkpoint, "t1_to_t2", back=identity)
    assert held.back is identity and held(images)[1].max() < 1e-6


def test_averaged_translation_and_tta_map_share_their_copies(trained):
    """--tta with --uncertainty tta: the 10 copies are both the translation (mean) and the map (std), run once."""
    checkpoint = resolve_checkpoint(trained)
    images = torch.rand(2, 1, 64, 64)
    counted = Counted(load_generator(checkpoint, "t1_to_t2")[0])
    averaged = Translator([counted], tta=True)
    translated, spread = HallucinationMap("tta", averaged, checkpoint, "t1_to_t2")(images)
    assert counted.calls == 10
    assert torch.allclose(translated, translate(averaged, images), atol=1e-6)
    assert torch.allclose(spread, translate(averaged.copies, images).std(0), atol=1e-6)
    counted.calls = 0
    single, _ = HallucinationMap("tta", Translator([counted]), checkpoint, "t1_to_t2")(images)  # one pass beside the map: 1 + 10
    assert counted.calls == 11 and torch.equal(single, translate(counted, images))


@pytest.fixture(scope="module")
def trained_with_scales(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "aleatoric"
    train("--data", shards_dir, "--out", out, *SMALL, "--max_steps", 20, "--steps_per_epoch", 20, "--lambda_aleatoric", 1)
    return resolve_checkpoint(out)


def test_aleatoric_map_is_the_generators_own_error_estimate(trained_with_scales):
    """The translation and its map come from one pass (or, with --tta, the 10 copies'): the map is the scale
    head's E|error|, halved into the [0,1] image's units."""
    images = torch.rand(2, 1, 64, 64)
    counted = Counted(load_generator(trained_with_scales, "t2_to_t1")[0])
    translated, scale = HallucinationMap("aleatoric", Translator([counted]), trained_with_scales, "t2_to_t1")(images)
    assert counted.calls == 1, "the translation and its scale from one pass"
    assert torch.allclose(translated, translate(counted.net, images), atol=1e-6)
    assert torch.allclose(scale, counted.net.with_scale(images * 2 - 1)[:, 1:] / 2)
    assert scale.min() > 0
    averaged = Translator([counted.net], tta=True)
    tta_translated, tta_scale = HallucinationMap("aleatoric", averaged, trained_with_scales, "t2_to_t1")(images)
    assert torch.allclose(tta_translated, translate(averaged, images), atol=1e-6)
    assert torch.allclose(tta_scale, averaged.copies(images * 2 - 1, with_scale=True)[:, :, 1:].mean(0) / 2)


def test_aleatoric_map_needs_a_run_trained_with_scale_heads(trained, trained_with_scales, fidelity_shards, shards_dir, tmp_path):
    checkpoint = resolve_checkpoint(trained)
    with pytest.raises(CheckpointError, match=f"{checkpoint}.*--lambda_aleatoric"):
        HallucinationMap("aleatoric", load_translator([checkpoint], "t1_to_t2")[0], checkpoint, "t1_to_t2")
    result = train("--data", shards_dir, "--out", tmp_path / "resnet", *SMALL, "--max_steps", 2, "--generator", "resnet9",
                   "--lambda_aleatoric", 1, check=False)
    assert result.returncode != 0 and "--lambda_aleatoric 1.0: needs --generator unet" in result.stderr
    out = tmp_path / "report"
    run_module("train.evaluate", "--checkpoint", trained_with_scales, "--data", fidelity_shards / "test", "--out", out,
               "--uncertainty", "aleatoric")
    report = json.loads((out / "report.json").read_text())
    assert report["uncertainty"]["mode"] == "aleatoric"
    assert all(0 <= report["uncertainty"]["directions"][d]["auroc"] <= 1 for d in ("t1_to_t2", "t2_to_t1"))


def test_ensemble_needs_two_checkpoints(trained, shards_dir, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(trained, run)
    *others, last = sorted((run / "checkpoints").iterdir())  # the last two, and the best where it is older
    for path in others:
        shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="needs a run folder with at least two kept checkpoints"):
        HallucinationMap("ensemble", load_translator([last], "t1_to_t2")[0], last, "t1_to_t2")
    result = run_module("train.evaluate", "--checkpoint", last, "--data", shards_dir / "test", "--out", tmp_path / "e",
                        "--uncertainty", "ensemble", check=False)
    assert result.returncode != 0 and str(last) in result.stderr and "ensemble" in result.stderr


def kept_checkpoints(run):
    return sorted((run / "checkpoints").iterdir())


def test_an_ensemble_translates_as_its_members_mean_and_its_maps_spread_over_them(trained):
    """Several checkpoints: the translation is the members' mean; the tta map is the spread of every member's 10
    copies together (with --tta their mean is the translation); the ensemble map is the members' spread."""
    kept = kept_checkpoints(trained)
    images = torch.rand(2, 1, 64, 64)
    members = [load_generator(path, "t2_to_t1")[0] for path in kept]
    net, info = load_translator(kept, "t2-to-t1")
    assert len(net.members) == len(kept) >= 2 and info["members"] == [str(path) for path in kept]
    singles = torch.stack([translate(member, images) for member in members])
    assert torch.allclose(translate(net, images), singles.mean(0), atol=1e-6)
    copies = torch.cat([translate(Translator([member], tta=True).copies, images) for member in members])
    assert copies.shape[0] == 10 * len(kept) and torch.allclose(translate(net.averaged().copies, images), copies, atol=1e-6)

    translated, spread = HallucinationMap("tta", net, kept, "t2_to_t1")(images)
    assert torch.allclose(translated, singles.mean(0), atol=1e-6) and torch.allclose(spread, copies.std(0), atol=1e-5)
    averaged = load_translator(kept, "t2_to_t1", tta=True)[0]
    translated, spread = HallucinationMap("tta", averaged, kept, "t2_to_t1")(images)
    assert torch.allclose(translated, copies.mean(0), atol=1e-6) and torch.allclose(spread, copies.std(0), atol=1e-5)
    _, spread = HallucinationMap("ensemble", averaged, kept, "t2_to_t1")(images)  # the members' single passes, even with --tta
    assert torch.allclose(spread, singles.std(0), atol=1e-5) and spread.max() > 0
    one, info = load_translator(kept[:1], "t2_to_t1")
    assert len(one.members) == 1 and "members" not in info  # one checkpoint: no ensemble


def test_an_ensemble_refuses_a_repeated_or_mismatched_member(trained, trained_with_scales, tmp_path):
    kept = kept_checkpoints(trained)
    best = resolve_checkpoint(trained)
    with pytest.raises(CheckpointError, match=f"{best}: given twice"):
        load_translator([trained, best], "t1_to_t2")  # the run folder stands for its best checkpoint
    other = tmp_path / "other"
    shutil.copytree(kept[0], other)
    info = json.loads((other / "checkpoint.json").read_text())
    info["preprocessing"]["fov_mm"] *= 2
    (other / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=f"{other}: preprocessing .* differs from {kept[0]}'s"):
        load_translator([kept[0], other], "t1_to_t2")
    with pytest.raises(CheckpointError, match="'aleatoric' reads one checkpoint's scale heads, not an ensemble's"):
        HallucinationMap("aleatoric", Translator([load_generator(trained_with_scales, "t1_to_t2")[0], load_generator(kept[0], "t1_to_t2")[0]]),
                         [trained_with_scales, kept[0]], "t1_to_t2")
    result = run_module("train.translate", "--checkpoint", kept[0], other, "--direction", "t1-to-t2", "--input", tmp_path,
                        "--output", tmp_path / "out", check=False)
    assert result.returncode != 0 and f"--checkpoint {other}: preprocessing" in result.stderr


def test_evaluate_and_translate_take_an_ensemble(trained, fidelity_shards, fidelity_tars, tmp_path):
    kept = kept_checkpoints(trained)
    reports = {}
    for name, checkpoints in (("single", kept[:1]), ("ensemble", kept)):
        run_module("train.evaluate", "--checkpoint", *checkpoints, "--data", fidelity_shards / "test", "--out", tmp_path / name,
                   "--uncertainty", "tta")
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    ensemble = reports["ensemble"]
    assert ensemble["members"] == [str(path) for path in kept] and "members" not in reports["single"]
    assert ensemble["checkpoint"] == str(kept[0]) and f"in an ensemble of {len(kept)}" in (tmp_path / "ensemble" / "report.md").read_text()
    assert 0 <= ensemble["uncertainty"]["directions"]["t1_to_t2"]["auroc"] <= 1
    summary = {name: r["directions"]["t1_to_t2"]["summary"]["ssim_masked"]["mean"] for name, r in reports.items()}
    assert summary["single"] != summary["ensemble"]

    with tarfile.open(fidelity_tars / "IXI-T1.tar") as tar:
        member = sorted(tar.getmembers(), key=lambda m: m.name)[0]
        volume = tmp_path / member.name
        volume.write_bytes(tar.extractfile(member).read())
    outputs = {}
    for name, checkpoints in (("single", kept[:1]), ("ensemble", kept)):
        run_module("train.translate", "--checkpoint", *checkpoints, "--direction", "t1-to-t2", "--input", volume,
                   "--output", tmp_path / f"out-{name}")
        outputs[name] = np.asarray(nib.load(tmp_path / f"out-{name}" / f"{member.name[:-len('.nii.gz')]}_t1-to-t2.nii.gz").dataobj)
    assert outputs["ensemble"].shape == outputs["single"].shape and not np.allclose(outputs["ensemble"], outputs["single"])


def test_evaluate_reports_auroc_and_lesion_metrics(trained, fidelity_shards, tmp_path):
    out = tmp_path / "report"
    run_module("train.evaluate", "--checkpoint", trained, "--data", fidelity_shards / "test", "--out", out, "--uncertainty", "tta")
    report = json.loads((out / "report.json").read_text())
    for direction in ("t1_to_t2", "t2_to_t1"):
        auroc = report["uncertainty"]["directions"][direction]["auroc"]
        assert 0 <= auroc <= 1
    assert report["uncertainty"]["mode"] == "tta" and report["uncertainty"]["error_threshold"] == 0.1
    manifest = read_manifest(fidelity_shards)
    lesion_in_test = set(manifest["held_out"]["lesion_masks"]) & set(manifest["splits"]["test"]["subjects"])
    if lesion_in_test:
        lesions = report["lesions"]["t1_to_t2"]
        assert lesions["subjects"] == 1 and lesions["lesions"] >= 1 and 0 <= lesions["visible_fraction"] <= 1
        assert lesions["contrast_truth"] > 0 > report["lesions"]["t2_to_t1"]["contrast_truth"]
        assert 0 <= lesions["map_rank"] <= 1 and 0 <= lesions["flagged_fraction"] <= 1
        assert "lost lesions flagged" in (out / "report.md").read_text()
        # one row per direction, both the test split's slice with the most lesion pixels; its mask comes last
        most = max(int(s["lesion"].sum()) for s in read_samples(split_shards(fidelity_shards / "test")) if "lesion" in s)
        lesion_grid = np.asarray(Image.open(out / "lesions.png"))
        size = (lesion_grid.shape[0] - 2) // 2
        assert lesion_grid.shape == (2 * size + 2, 6 * size + 5 * 2)  # 4 columns, the map, the lesion mask
        for row in (0, 1):
            assert (lesion_grid[row * (size + 2):row * (size + 2) + size, -size:] == 255).sum() == most
    else:
        assert report["lesions"] == {} and not (out / "lesions.png").exists()
    assert "AUROC" in (out / "report.md").read_text()


def test_the_fidelity_bench_measures_a_checkpoints_noise_transfer_both_ways(trained, fidelity_shards, monkeypatch):
    """bench/fidelity_bench.py's column: the checkpoint's own generators, on slices spread over val+test."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from fidelity_bench import noise_slices, noise_transfers, scored_samples

    slices = noise_slices(scored_samples(fidelity_shards)[1], count=8)
    test_keys = {s["key"] for s in read_samples(split_shards(fidelity_shards / "test"))}
    assert len(slices) == 8 and test_keys & {s["key"] for s in slices}
    checkpoint = max((trained / "checkpoints").glob("step-*"))
    figures = noise_transfers([checkpoint], slices, tta=False)
    images = torch.from_numpy(np.stack([s["t2"] for s in slices]))[:, None]
    mask = torch.from_numpy(np.stack([s["mask"] for s in slices]))[:, None]
    direct = noise_transfer(load_generator(checkpoint, "t2_to_t1")[0], load_generator(checkpoint, "t1_to_t2")[0], images, mask)
    assert figures["t2_to_t1"] == pytest.approx(direct, rel=1e-4)
    assert set(figures) == {"t1_to_t2", "t2_to_t1"} and all(f["passed"] > 0 for f in figures.values())


def test_translate_writes_a_hallucination_map_beside_each_volume(trained, fidelity_tars, tmp_path):
    with tarfile.open(fidelity_tars / "IXI-T2.tar") as tar:
        member = sorted(tar.getmembers(), key=lambda m: m.name)[0]
        volume = tmp_path / member.name
        volume.write_bytes(tar.extractfile(member).read())
    run_module("train.translate", "--checkpoint", trained, "--direction", "t2-to-t1", "--input", volume,
               "--output", tmp_path / "out", "--uncertainty", "cycle")
    stem = member.name[: -len(".nii.gz")]
    translation = nib.load(tmp_path / "out" / f"{stem}_t2-to-t1.nii.gz")
    hmap = nib.load(tmp_path / "out" / f"{stem}_t2-to-t1_uncertainty-cycle.nii.gz")
    source = nib.load(volume)
    assert hmap.shape == translation.shape == source.shape and np.allclose(hmap.affine, source.affine)
    data = np.asarray(hmap.dataobj)
    assert data.min() >= 0 and data.max() > 0


def test_pack_names_a_missing_holdout_file(fidelity_tars, tmp_path):
    missing = tmp_path / "nope.txt"
    result = run_module("shards", "pack", "--t1", fidelity_tars / "IXI-T1.tar", "--t2", fidelity_tars / "IXI-T2.tar",
                        "--out", tmp_path / "s", "--holdout", missing, check=False)
    assert result.returncode == 1 and f"--holdout {missing}" in result.stderr
    assert not (tmp_path / "s").exists(), "nothing is written"


def test_the_mind_floor_bench_shows_the_truths_own_noise_charged_less_under_the_floor_and_structure_still_costing(shards_dir, trained):
    """bench/mind_floor.py: a row per direction and floor; a pixel's shift costs more than the truth at every
    floor, and the truth's flat half, where the distances are its noise, costs less with the floor."""
    done = subprocess.run([sys.executable, "bench/mind_floor.py", "--data", shards_dir / "test", shards_dir / "val", "--checkpoint", trained,
                           "--floors", "0", "3", "--every", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| t")]
    table = {(row[0].strip(), float(row[1])): row[2:] for row in rows}
    assert set(table) == {(d, f) for d in ("t1_to_t2", "t2_to_t1") for f in (0.0, 3.0)}
    for truth, *_, moved, translation in table.values():
        assert float(moved) > float(truth.split()[0]) and float(translation) > 0
    flat_half = {key: float(cells[0].split()[1].strip("()")) for key, cells in table.items()}
    for direction in ("t1_to_t2", "t2_to_t1"):
        assert flat_half[direction, 3.0] < 0.9 * flat_half[direction, 0.0]


def test_the_ssim_loss_bench_splits_the_scorers_ssim_into_parts_that_add_up(shards_dir, trained):
    """bench/ssim_loss.py: its SSIM is the scorer's (train/metrics.py, pooled over head pixels), and the
    shares of the loss by depth, by edge strength and by the slice's head area each add up to all of it."""
    folders = [shards_dir / "test", shards_dir / "val"]
    done = subprocess.run([sys.executable, "bench/ssim_loss.py", "--checkpoint", trained, "--data", *folders], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    samples = list(read_samples([path for folder in folders for path in split_shards(folder)]))
    mask = torch.from_numpy(np.stack([s["mask"] for s in samples]))[:, None] > 0
    blocks = done.stdout.split("t2_to_t1:")
    for (direction, (source, target)), block in zip(rundir.DIRECTIONS.items(), blocks):
        net = load_translator([trained], direction)[0]
        with torch.no_grad():
            pred = translate(net, torch.from_numpy(np.stack([s[source] for s in samples]))[:, None])
        metrics = slice_metrics(pred, torch.from_numpy(np.stack([s[target] for s in samples]))[:, None], mask)
        pooled = float((metrics["ssim_masked"] * metrics["mask_area"]).sum() / metrics["mask_area"].sum())
        assert float(block.split("SSIM over head pixels ")[1].split()[0]) == pytest.approx(pooled, abs=2e-3)
        shares = [float(line.split("% of the loss")[0].split()[-1]) for line in block.splitlines() if "% of the loss" in line]
        assert len(shares) == 12 and all(sum(group) == pytest.approx(100, abs=0.3) for group in (shares[:5], shares[5:9], shares[9:]))
        area = mask.sum(dim=(1, 2, 3)).numpy()
        subjects = [s["meta"]["subject"] for s in samples]
        largest = np.array([max(a for a, other in zip(area, subjects) if other == subject) for subject in subjects])
        counts = [int(line.split(" slices,")[0].split()[-1]) for line in block.splitlines() if " of the largest head: " in line]
        assert counts == [int(((area / largest > low) & (area / largest <= high)).sum()) for low, high in ((0, 0.5), (0.5, 0.8), (0.8, 1))]
        assert sum(counts) == len(samples)
        truth = np.stack([s[target] for s in samples])[:, None]
        csf = (np.stack([s["t2"] for s in samples])[:, None] > 0.85) & mask.numpy()
        bright = np.pad(np.stack([s["t2"] for s in samples])[:, None] > 0.85, ((0, 0), (0, 0), (1, 1), (1, 1)))
        h, w = truth.shape[-2:]
        csf = mask.numpy() & np.all([bright[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        high_pass = [(image - ndimage.gaussian_filter(image, (0, 0, 1, 1)))[csf].std() for image in (pred.numpy(), truth)]
        line = block.split("in CSF (")[1]
        assert int(line.split()[0]) == csf.sum() > 0
        assert float(line.split(" = ")[1].split()[0]) == pytest.approx(high_pass[0] / high_pass[1], abs=0.006)


def test_the_paired_reference_trains_the_asked_generator_on_the_trainers_schedule(ixi_tars, tmp_path):
    """bench/demo_bounds.py: the paired-L1 U-Net takes the trainer's depth, upsampling, full-resolution stage and learning-rate decay,
    and both reference rows come out as SSIM scores per direction. Ten subjects leave nothing to score on: a
    clear error."""
    def bounds(ixi):
        return subprocess.run([sys.executable, "bench/demo_bounds.py", "--ixi", ixi, "--size", "32", "--steps", "30", "--ngf", "8",
                               "--batch-size", "2", "--unet-depth", "3", "--upsample", "subpixel", "--full-res", "4", "--lr", "5e-4",
                               "--lr-decay-start", "0.5"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    too_few = bounds(ixi_tars)
    assert too_few.returncode != 0 and f"--ixi {ixi_tars}: too few subjects" in too_few.stderr
    run_module("shards", "synth", "--out", tmp_path, "--subjects", 16, "--seed", 1, "--downsample", 8)
    done = bounds(tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split(":")[0]: line for line in done.stdout.splitlines() if "->" in line}
    assert set(rows) == {"T1 -> T2", "T2 -> T1"}
    for line in rows.values():
        scores = [float(score) for score in re.findall(r" (-?\d+\.\d{3})(?=,|$)", line)]
        assert len(scores) == 2 and all(-1 <= score <= 1 for score in scores)
    # each reference again by the slice's head area, over groups that hold every test slice
    test_slices = int(done.stdout.split(" test slices")[0].split()[-1])
    by_area = [line for line in done.stdout.splitlines() if ", by head area: " in line]
    assert len(by_area) == 4
    for line in by_area:
        groups = re.findall(r"(under 50%|50-80%|over 80%) \((\d+) slices\)(?: (-?\d+\.\d{3}))?", line)
        assert [name for name, _, _ in groups] == ["under 50%", "50-80%", "over 80%"]
        assert sum(int(count) for _, count, _ in groups) == test_slices
        assert all((-1 <= float(score) <= 1) if int(count) else score == "" for _, count, score in groups)


def test_the_paired_reference_pools_each_group_of_slices_over_head_pixels(monkeypatch):
    # Pooled over pixels, a small slice weighs less than a large one: 0.25 over 80%, where a mean over slices says
    # 0.5. A share of exactly half is under 50%, as bench/ssim_loss.py counts it.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import demo_bounds

    metrics = {"ssim_masked": torch.tensor([0.8, 1.0, 0.0, 0.6]), "mask_area": torch.tensor([20.0, 10.0, 30.0, 50.0])}
    line = demo_bounds.by_head_area(metrics, np.array([0.4, 0.9, 1.0, 0.5]))
    assert line == "under 50% (2 slices) 0.657, 50-80% (0 slices), over 80% (2 slices) 0.250"


def test_the_template_brain_holds_out_two_bands_with_margins_and_draws_t2_from_the_tissue_maps(monkeypatch, tmp_path):
    """bench/template_brain.py on a small stand-in for nilearn's MNI152 files: what packs into train is never within
    the margin of a scored slice, CSF is T2's brightest tissue and WM its darkest, air stays zero, and the packer
    splits it 93 / 20."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import template_brain

    folder = tmp_path / "nilearn-data"
    folder.mkdir()
    x, y, _ = np.meshgrid(np.arange(40), np.arange(48), np.arange(160), indexing="ij")
    brain = (x - 20) ** 2 / 15 ** 2 + (y - 24) ** 2 / 19 ** 2 < 1
    wm, gm = brain & (x < 14), brain & (x >= 14) & (x < 26)  # and CSF beyond x = 26
    t1 = np.where(brain, np.where(wm, 230.0, np.where(gm, 150.0, 60.0)), 0)
    for name, volume in {"t1": t1, "gm": gm * 255.0, "wm": wm * 255.0}.items():
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    monkeypatch.setattr(template_brain, "template_folder", lambda: folder)

    out = tmp_path / "template"
    template_brain.write_template_slices(out)
    held = out.joinpath("holdout.txt").read_text().split()
    names = sorted(p.stem for p in (out / "t1").glob("*.png"))
    assert names == sorted(p.stem for p in (out / "t2").glob("*.png")) and len(held) == 20 and len(names) == 113
    trained_on = [int(n.removeprefix("mni-z")) for n in names if n not in held]
    assert len(trained_on) == 93
    assert min(abs(z - int(h.removeprefix("mni-z"))) for z in trained_on for h in held) == template_brain.MARGIN + 1
    wm_px, gm_px, brain_px = (np.rot90(m[:, :, 0]) for m in (wm, gm, brain))  # the slices' orientation
    t2 = np.asarray(Image.open(out / "t2" / f"{held[0]}.png"), np.float64)
    medians = [np.median(t2[m]) for m in (wm_px, gm_px, brain_px & ~wm_px & ~gm_px)]
    assert 0 < medians[0] < medians[1] < medians[2] and (t2[~brain_px] == 0).all()

    shards = tmp_path / "shards"
    run_module("shards", "pack", "--t1", out / "t1", "--t2", out / "t2", "--out", shards, "--size", 32,
               "--holdout", out / "holdout.txt", "--split", "1,0,0")
    splits = {name: split["subjects"] for name, split in read_manifest(shards)["splits"].items()}
    assert len(splits["train"]) == 93 and sorted(splits["val"] + splits["test"]) == held


def test_the_template_brain_says_how_to_get_the_template(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import template_brain

    monkeypatch.setattr(template_brain.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps nilearn"):
        template_brain.template_folder()
