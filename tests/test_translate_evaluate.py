"""train.translate (NIfTI in, NIfTI out, any orientation) and train.evaluate (per-subject paired report)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import SMALL, run_module, train
from shards.preprocess import load_nifti
from train import rundir
from train.inference import Translator, resolve_checkpoint, translate, translate_volume
from train.metrics import brightness, brightness_sums, slice_metrics
from train.scoring import summarize


class PassThrough(nn.Module):
    """A 'generator' that returns its input: isolates the geometry of translate_volume from the model."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # inference reads the device from the parameters

    def forward(self, x):
        return x


class ShiftRight(PassThrough):
    """A 'generator' that is not flip-equivariant: moves the image one pixel right (circularly)."""

    def forward(self, x):
        return x.roll(1, dims=-1)


def test_test_time_augmentation_moves_each_copy_back_before_averaging():
    x = torch.rand(2, 1, 16, 16)
    copies = Translator([PassThrough()], tta=True).copies(x)
    assert copies.shape == (10, 2, 1, 16, 16)
    assert torch.equal(copies, x.expand_as(copies)), "every flipped/shifted copy lands back on the input"
    # shifts commute with a one-pixel move, flips mirror it: half the copies move right, half left
    averaged = Translator([ShiftRight()], tta=True)(x)
    assert torch.allclose(averaged, (x.roll(1, dims=-1) + x.roll(-1, dims=-1)) / 2)


@pytest.fixture(scope="module")
def t1_volume(ixi_tars, tmp_path_factory):
    out = tmp_path_factory.mktemp("vol")
    with tarfile.open(ixi_tars / "IXI-T1.tar") as tar:
        member = sorted(tar.getmembers(), key=lambda m: m.name)[0]
        path = out / member.name
        path.write_bytes(tar.extractfile(member).read())
    return path


def head_correlation(a: np.ndarray, b: np.ndarray) -> float:
    head = b > 0.05
    return float(np.corrcoef(a[head], b[head])[0, 1])


def test_volume_geometry_round_trips_in_any_orientation(t1_volume):
    """IXI T1 is stored PIR. A pass-through model must give back the input's anatomy on the input's grid,
    and the same anatomy when the file is stored in RAS instead."""
    data, affine, _ = load_nifti(t1_volume.read_bytes())
    prep = {"size": 64, "fov_mm": 256.0}
    out = translate_volume(PassThrough(), data, affine, prep)
    assert out.shape == data.shape and 0 <= out.min() and out.max() <= 1
    assert head_correlation(data, out) > 0.9

    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert nib.aff2axcodes(affine) != ("R", "A", "S") and nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    out_ras = translate_volume(PassThrough(), np.asarray(canonical.dataobj), canonical.affine, prep)
    back = nib.as_closest_canonical(nib.Nifti1Image(out, affine)).get_fdata()
    assert np.abs(back - out_ras).mean() < 0.01


def test_translate_writes_a_nifti_on_the_input_grid(trained, t1_volume, tmp_path):
    checkpoint = rundir.checkpoint_dir(trained, 40)
    run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1_to_t2", "--input", t1_volume, "--output", tmp_path)
    produced = tmp_path / t1_volume.name.replace("-T1.nii.gz", "-T1_t1-to-t2.nii.gz")
    source, result = nib.load(t1_volume), nib.load(produced)
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    assert result.get_data_dtype() == np.float32
    values = result.get_fdata()
    assert 0 <= values.min() and values.max() <= 1 and (values > 0).mean() > 0.05, "a translated head, not an empty volume"
    assert not list(tmp_path.glob(".*"))


def test_translate_keeps_an_image_size(trained, tmp_path):
    Image.fromarray((np.random.default_rng(0).random((181, 217)) * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "slice.png")
    run_module("train.translate", "--checkpoint", rundir.checkpoint_dir(trained, 40), "--direction", "t2-to-t1",
               "--input", tmp_path / "slice.png", "--output", tmp_path / "out")
    with Image.open(tmp_path / "out" / "slice_t2-to-t1.png") as im:
        assert im.size == (217, 181) and im.mode in ("I;16", "I")


@pytest.mark.parametrize("case", ["checkpoint", "4d", "not-nifti", "corrupt", "nan", "zero", "exists"])
def test_translate_bad_input(case, trained, t1_volume, tmp_path):
    checkpoint, inp = rundir.checkpoint_dir(trained, 40), t1_volume
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    expect = {"checkpoint": "not a checkpoint folder", "4d": "expected a 3D volume", "not-nifti": "not a NIfTI volume",
              "corrupt": "truncated", "nan": "all voxels are NaN", "zero": "all voxels are zero",
              "exists": "already exists"}[case]
    if case == "checkpoint":
        checkpoint = tmp_path
    elif case == "4d":
        inp = tmp_path / "four.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), affine), inp)
    elif case == "not-nifti":
        inp = tmp_path / "notes.txt"
        inp.write_text("hello")
    elif case == "corrupt":
        inp = tmp_path / "broken.nii.gz"
        inp.write_bytes(t1_volume.read_bytes()[:5000])
    elif case in ("nan", "zero"):
        inp = tmp_path / f"{case}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan if case == "nan" else 0.0, np.float32), affine), inp)
    elif case == "exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / t1_volume.name.replace(".nii.gz", "_t1-to-t2.nii.gz")).write_text("old")
    result = run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", inp,
                        "--output", tmp_path / "out", check=False)
    assert result.returncode != 0 and expect in result.stderr, result.stderr[-2000:]
    named = {"checkpoint": str(checkpoint), "exists": inp.name.replace(".nii.gz", "_t1-to-t2.nii.gz")}.get(case, inp.name)
    assert named in result.stderr
    out = tmp_path / "out"
    if case == "exists":
        assert [p.read_text() for p in out.iterdir()] == ["old"], "nothing replaced without --overwrite"
    else:
        assert not out.exists() or not any(out.iterdir()), "no partial output"


def test_evaluate_reports_per_subject_and_matches_validation(trained, shards_dir, tmp_path):
    checkpoint = rundir.checkpoint_dir(trained, 40)
    result = run_module("train.evaluate", "--checkpoint", checkpoint, "--data", shards_dir / "val", "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "evaluate: 100%" in result.stderr and f"{report['slices']}/{report['slices']}" in result.stderr  # a progress bar with a total
    logged = next(r for r in rundir.read_metrics(trained) if r["step"] == 40 and "val/ssim_masked_mean" in r)
    assert report["slices"] == logged["val/slices"]
    for direction in ("t1_to_t2", "t2_to_t1"):
        part = report["directions"][direction]
        for metric in ("ssim", "ssim_masked", "psnr_masked", "mae_masked", "texture"):
            assert part["slice_mean"][metric] == pytest.approx(logged[f"val/{direction}/{metric}"], abs=1e-4), (direction, metric)
        for key, name in (("mean", "brightness"), ("std", "brightness_std")):  # validation sums what evaluate pools
            assert part["summary"]["brightness"][key] == pytest.approx(logged[f"val/{direction}/{name}"], abs=1e-4), (direction, name)
        assert len(part["subjects"]) == report["subjects"] >= 1
        assert part["summary"]["ssim_masked"]["mean"] == pytest.approx(np.mean([s["ssim_masked"] for s in part["subjects"]]))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "report.csv").read_text())))
    assert len(rows) == report["subjects"] and float(rows[0]["t1_to_t2_ssim_masked"]) == pytest.approx(
        report["directions"]["t1_to_t2"]["subjects"][0]["ssim_masked"], abs=1e-5)
    with Image.open(tmp_path / "report" / "figure.png") as im:
        assert im.size == (4 * 64 + 3 * 2, 6 * 64 + 5 * 2)  # worst/median/best x 2 directions; 4 columns
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "masked SSIM" in markdown and "texture" in markdown and "brightness vs truth" in markdown
    for direction in ("t1_to_t2", "t2_to_t1"):
        cell = report["directions"][direction]["summary"]["brightness"]
        assert f"{cell['mean']:.3f} ± {cell['std']:.3f}" in markdown and cell["std"] > 0


def test_texture_is_one_for_the_truth_above_one_for_speckle_and_below_for_blur():
    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    truth = (0.5 + 0.3 * torch.sin(x / 3) * torch.cos(y / 4))[None, None]
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[..., 8:56, 8:56] = True
    checkerboard = 0.05 * (-1.0) ** (x + y)
    blurred = nn.functional.avg_pool2d(truth, 5, 1, 2, count_include_pad=False)
    texture = {name: slice_metrics(pred, truth, mask)["texture"].item()
               for name, pred in (("truth", truth), ("speckle", truth + checkerboard), ("blur", blurred))}
    assert texture["truth"] == pytest.approx(1.0) and texture["speckle"] > 1.5 and texture["blur"] < 0.9, texture


def test_brightness_is_each_slices_mean_over_the_truths_weighted_by_head_area():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    truth = (0.4 + 0.3 * torch.sin(x / 3) * torch.cos(y / 4)).expand(4, 1, 32, 32).clone()
    gains, sides = torch.tensor([1.1, 0.9, 1.0, 7.0]), (24, 12, 16, 0)  # the fourth slice has no head, so no weight
    mask = torch.zeros_like(truth, dtype=torch.bool)
    for i, side in enumerate(sides):
        mask[i, :, :side, :side] = True
    pred = truth * gains[:, None, None, None] + 0.005 * torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * mask
    metrics = slice_metrics(pred.clamp(0, 1), truth, mask)
    rows = [{"key": str(i), "subject": "s", **{k: float(v[i]) for k, v in metrics.items()}} for i in range(4)]
    area = np.array([side * side for side in sides[:3]], np.float64)
    mean = float((gains[:3].numpy() * area).sum() / area.sum())
    std = float(np.sqrt((np.square(gains[:3].numpy() - mean) * area).sum() / area.sum()))
    pooled = summarize(rows)["summary"]["brightness"]
    assert pooled["mean"] == pytest.approx(mean, abs=2e-3) and pooled["std"] == pytest.approx(std, abs=2e-3), (pooled, mean, std)
    steady = summarize([{**row, "mean_pred": row["mean_truth"] * 1.2} for row in rows])["summary"]["brightness"]
    assert steady["mean"] == pytest.approx(1.2) and steady["std"] == pytest.approx(0.0, abs=1e-9)  # a constant gain is no spread
    assert summarize(rows[3:])["summary"]["brightness"] == {"mean": None, "std": None}
    halves = [brightness_sums({k: v[part] for k, v in metrics.items()}) for part in (slice(0, 2), slice(2, 4))]
    assert brightness(halves[0] + halves[1]) == pytest.approx(brightness(brightness_sums(metrics)))  # as validation adds up batches


def test_the_intensity_shift_bench_shifts_the_input_and_scores_as_evaluate_does(trained, shards_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from intensity_shift import ShiftedInput, main

    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(translate(ShiftedInput(PassThrough(), 0.8, 1.1), x), (1.1 * x**0.8).clamp(0, 1), atol=1e-6)
    checkpoint = rundir.checkpoint_dir(trained, 40)
    run_module("train.evaluate", "--checkpoint", checkpoint, "--data", shards_dir / "val", "--out", tmp_path / "report", "--report_to", "none")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    main(["--checkpoint", str(checkpoint), "--data", str(shards_dir / "val"), "--shifts", "1,1", "0.5,1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {checkpoint}")]
    assert [row[1] for row in rows] == ["T1→T2", "T2→T1"]
    for row, direction in zip(rows, ("t1_to_t2", "t2_to_t1")):
        unshifted, shifted, drop = float(row[2]), float(row[3]), float(row[4].rstrip(" |"))
        assert unshifted == pytest.approx(report["directions"][direction]["summary"]["ssim_masked"]["mean"], abs=5e-4)
        assert shifted != unshifted and drop == pytest.approx(max(0.0, unshifted - shifted), abs=1e-3)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--data", str(shards_dir / "val"), "--shifts", "0.8"])
    assert "a shift is GAMMA,GAIN" in capsys.readouterr().err


def test_val_tta_validates_what_evaluate_tta_reports_and_translate_tta_writes(shards_dir, tmp_path):
    run = tmp_path / "tta"
    train("--data", shards_dir, "--out", run, *SMALL, "--max_steps", 6, "--steps_per_epoch", 6, "--val_tta", "true")
    logged = next(r for r in rundir.read_metrics(run) if r["step"] == 6 and "val/ssim_masked_mean" in r)
    checkpoint = rundir.checkpoint_dir(run, 6)
    for tta in (True, False):
        out = tmp_path / f"report-tta-{tta}"
        run_module("train.evaluate", "--checkpoint", checkpoint, "--data", shards_dir / "val", "--out", out, *["--tta"] * tta)
        report = json.loads((out / "report.json").read_text())
        assert report["tta"] is tta and ("--tta" in (out / "report.md").read_text()) is tta
        evaluated = [report["directions"][d]["slice_mean"]["ssim_masked"] for d in ("t1_to_t2", "t2_to_t1")]
        matches = evaluated == pytest.approx([logged[f"val/{d}/ssim_masked"] for d in ("t1_to_t2", "t2_to_t1")], abs=1e-4)
        assert matches is tta, (tta, evaluated, logged)
    image = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(image)
    translations = []
    for tta in (True, False):
        run_module("train.translate", "--checkpoint", checkpoint, "--direction", "t1-to-t2", "--input", image,
                   "--output", tmp_path / f"translated-{tta}", *["--tta"] * tta)
        with Image.open(tmp_path / f"translated-{tta}" / "slice_t1-to-t2.png") as im:
            translations.append(np.asarray(im, dtype=np.float64))
    assert translations[0].shape == translations[1].shape == (64, 64)
    assert np.abs(translations[0] - translations[1]).mean() > 65, "the averaged translation differs from the single pass (by > 0.1%)"


@pytest.mark.parametrize("case", ["exists", "checkpoint", "data"])
def test_evaluate_bad_input(case, trained, shards_dir, tmp_path):
    args = {"--checkpoint": rundir.checkpoint_dir(trained, 40), "--data": shards_dir / "test", "--out": tmp_path / "report"}
    expect = {"exists": "already exists", "checkpoint": "not a checkpoint folder", "data": "no paired-*.tar shards"}[case]
    if case == "exists":
        (tmp_path / "report").mkdir()
    elif case == "checkpoint":
        args["--checkpoint"] = tmp_path
    else:
        args["--data"] = shards_dir / "train"
    result = run_module("train.evaluate", *[x for kv in args.items() for x in kv], check=False)
    assert result.returncode != 0 and expect in result.stderr, result.stderr[-2000:]
    assert case == "exists" or not (tmp_path / "report").exists()


def test_a_run_folder_stands_for_its_best_checkpoint(trained):
    summary = json.loads((trained / rundir.SUMMARY).read_text())
    assert resolve_checkpoint(trained) == rundir.checkpoint_dir(trained, summary["best_checkpoint_step"])
    assert resolve_checkpoint(rundir.checkpoint_dir(trained, 40)) == rundir.checkpoint_dir(trained, 40)
