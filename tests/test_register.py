"""pack --register: T2 onto T1, proven against synth --motion's true head motion."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from conftest import run_module
from shards import register
from shards.format import read_manifest
from shards.pack import PackOptions, pack, plan
from shards.preprocess import foreground, load_nifti
from shards.register import apply
from shards.sources import list_source
from train import rundir

PAIRED_SPLIT = ["--split", "0.2,0.4,0.4"]  # most subjects paired, so most are registered


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Five subjects at half IXI's matrix (1.9 mm voxels) whose heads moved up to 10 degrees and 10 mm between
    T1 and T2, packed with and without registration."""
    root = tmp_path_factory.mktemp("motion")
    run_module("shards", "synth", "--out", root / "ixi", "--subjects", 5, "--seed", 4, "--downsample", 2, "--motion", "10,10")
    for method in ("rigid", "none"):
        run_module("shards", "pack", "--t1", root / "ixi" / "IXI-T1.tar", "--t2", root / "ixi" / "IXI-T2.tar", "--out",
                   root / method, "--size", 64, "--workers", 2, "--register", method, *PAIRED_SPLIT)
    return root


def _volume(tar_path, subject) -> tuple[np.ndarray, np.ndarray]:
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(subject))
        data, affine, _ = load_nifti(tar.extractfile(member).read())
    return data, affine


def _head_points(tar_path, subject) -> np.ndarray:
    data, affine = _volume(tar_path, subject)
    return np.argwhere(foreground(data)) @ affine[:3, :3].T + affine[:3, 3]


def test_recovered_motion_is_within_1_mm_over_the_head_on_every_subject(moved):
    truth = json.loads((moved / "ixi" / "motion.json").read_text())["subjects"]
    found = read_manifest(moved / "rigid")["registration"]["subjects"]
    assert len(found) >= 4 and set(found) <= set(truth)
    largest = 0.0
    for subject, record in found.items():
        assert record["paired"], (subject, record)
        head = _head_points(moved / "ixi" / "IXI-T1.tar", subject)
        true_motion, recovered = np.array(truth[subject]), np.array(record["transform_ras"])
        largest = max(largest, float(np.linalg.norm(apply(true_motion, head) - head, axis=1).max()))
        residual = np.linalg.norm(apply(recovered, head) - apply(true_motion, head), axis=1)
        assert residual.max() <= 1.0, f"{subject}: {residual.max():.2f} mm residual displacement over the head"
    assert largest > 8.0  # the motion was there to be found


def test_packing_registers_a_subject_the_same_way_every_time(moved):
    # SimpleITK seeds its metric's sampling from the clock when given 0; with it, one pack of the same tars
    # recovered a subject's motion to 0.3 mm and another to 1.1 mm
    subject = sorted(read_manifest(moved / "rigid")["registration"]["subjects"])[0]
    volumes = [_volume(moved / "ixi" / f"IXI-{contrast}.tar", subject) for contrast in ("T1", "T2")]
    first, again = (register.register_rigid(*volumes[0], *volumes[1]) for _ in range(2))
    # threads may sum the metric in another order, which moves the last digits only; another sample moves
    # the transform by hundredths to tenths of a millimetre
    differ = np.linalg.norm(apply(first.matrix, first.head) - apply(again.matrix, first.head), axis=1).max()
    assert differ < 0.01, f"the same registration twice differs by {differ:.3f} mm over the head"
    with pytest.raises(ValueError, match="wall-clock seed"):
        register.register_rigid(*volumes[0], *volumes[1], seed=0)


def test_without_registration_the_paired_masks_disagree(moved):
    truth = json.loads((moved / "ixi" / "motion.json").read_text())["subjects"]
    registered = read_manifest(moved / "rigid")["registration"]["subjects"]
    unregistered = read_manifest(moved / "none")["registration"]
    assert unregistered["method"] == "none" and set(unregistered["subjects"]) == set(registered)
    for subject, record in unregistered["subjects"].items():
        head = _head_points(moved / "ixi" / "IXI-T1.tar", subject)
        motion = float(np.linalg.norm(apply(np.array(truth[subject]), head) - head, axis=1).mean())
        if motion > 3.0:  # a head that moved visibly: its masks overlap worse than after registration
            assert record["mask_dice"] < registered[subject]["mask_dice"] - 0.005, (subject, motion, record, registered[subject])
        assert registered[subject]["mask_dice"] > 0.98


def test_a_failed_registration_is_listed_and_its_volumes_train_unless_held_out(ixi_tars, tmp_path, monkeypatch):
    monkeypatch.setattr(register, "MIN_MASK_DICE", 1.01)  # no overlap can pass: every pair fails the check
    options = PackOptions(size=64, shard_size=100)
    _, splits = plan(list_source(ixi_tars / "IXI-T1.tar", "t1")[0], list_source(ixi_tars / "IXI-T2.tar", "t2")[0], options)
    planned = splits["val"] + splits["test"]
    held = planned[0]
    (tmp_path / "holdout.txt").write_text(f"{held}\n")
    manifest = pack(ixi_tars / "IXI-T1.tar", ixi_tars / "IXI-T2.tar", tmp_path / "shards", options, workers=2, progress=False,
                    holdout_file=tmp_path / "holdout.txt")
    records = manifest["registration"]["subjects"]
    assert set(records) == set(planned) and not any(r["paired"] for r in records.values())
    assert all("Dice" in r["reason"] and "MIN_MASK_DICE" in r["reason"] for r in records.values())
    assert manifest["splits"]["val"]["slices"]["paired"] == manifest["splits"]["test"]["slices"]["paired"] == 0
    trained_on = set(manifest["splits"]["train"]["subjects"])
    assert set(planned) - {held} <= trained_on and held not in trained_on
    reasons = {s["reason"] for s in manifest["skipped"]}
    assert any("not paired" in r and "went to train" in r for r in reasons)
    assert any("held out, so not trained on" in r for r in reasons)


def test_registration_refuses_an_implausible_transform():
    head = np.random.default_rng(0).uniform(-80, 80, size=(100, 3))
    turned = register.Registration(np.eye(4), metric=-0.5, iterations=10, head=head)
    turned.matrix[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # 90 degrees
    assert "MAX_ROTATION_DEG" in register.check(turned, 0.99)
    shifted = register.Registration(np.eye(4), metric=-0.5, iterations=10, head=head)
    shifted.matrix[:3, 3] = [0, 60, 0]
    assert "MAX_TRANSLATION_MM" in register.check(shifted, 0.99)
    assert register.check(register.Registration(np.eye(4), -0.5, 10, head), 0.99) is None


def test_evaluate_scores_registered_moved_heads_as_well_as_heads_that_never_moved(ixi_tars, shards_dir, trained, tmp_path):
    """The fixture's subjects again, their heads moved between T1 and T2: registered, the paired scores
    match the motion-free shards' within noise."""
    run_module("shards", "synth", "--out", tmp_path / "ixi", "--subjects", 10, "--seed", 1, "--downsample", 4, "--motion", "10,10")
    checkpoint = rundir.checkpoint_dir(trained, 40)
    scores = {}
    run_module("shards", "pack", "--t1", tmp_path / "ixi" / "IXI-T1.tar", "--t2", tmp_path / "ixi" / "IXI-T2.tar", "--out",
               tmp_path / "moved", "--size", 64, "--shard-size", 100, "--workers", 2)
    for name, data in (("still", shards_dir), ("moved", tmp_path / "moved")):
        run_module("train.evaluate", "--checkpoint", checkpoint, "--data", data / "test", "--out", tmp_path / f"report-{name}")
        report = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
        scores[name] = {d: report["directions"][d]["slice_mean"] for d in ("t1_to_t2", "t2_to_t1")}
    for direction, still in scores["still"].items():
        moved = scores["moved"][direction]
        # the registered T2 is resampled once more than the still one, which smooths it: up to 0.015 here
        assert moved["ssim_masked"] >= still["ssim_masked"] - 0.02, (direction, scores)
        assert moved["mae_masked"] <= still["mae_masked"] + 0.005, (direction, scores)
