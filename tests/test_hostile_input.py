"""Hostile and broken files: each one costs no more memory than a bound, gets a one-line error naming it, and
stops nothing else. The same files go through the loader, `shards pack`, `train.translate` and the dashboard's
upload (tests/test_dashboard.py); docs/bad-input.md lists every class."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL, run_module, train
from shards.format import ShardsError, encode_png16, read_manifest
from shards.preprocess import VolumeError, check_intensities, load_image, load_nifti, read_file
from train import rundir
from train.config import load_config

MEMORY_BOUND_MB = 1024  # for any of these files, whatever its header claims


def nifti_header(shape, datatype=np.int16) -> bytes:
    """A valid NIfTI-1 header (and the 4 extension bytes) claiming `shape`, with no voxel data behind it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(datatype)
    header.set_qform(np.eye(4), 1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def gzip_of_zeros(prefix: bytes, megabytes: int) -> bytes:
    """gzip of `prefix` and then `megabytes` MiB of zeros, built in chunks (the test never holds the zeros)."""
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, chunk = [stream.compress(prefix)], bytes(2**20)
    parts += [stream.compress(chunk) for _ in range(megabytes)]
    return b"".join(parts + [stream.flush()])


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height pixels, with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def good_volume(shape=(32, 32, 24)) -> bytes:
    data = np.zeros(shape, np.float32)
    data[8:24, 8:24, 6:18] = 100
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def damaged_deflate() -> bytes:
    data = bytearray(good_volume((64, 64, 48)))
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    return bytes(data)


def garbage_datatype() -> bytes:
    block = bytearray(nifti_header((8, 8, 8)))
    block[70:72] = struct.pack("<h", 9999)  # datatype: no such code
    return gzip.compress(bytes(block) + bytes(8 * 8 * 8 * 2))


def zero_affine() -> bytes:
    """An sform of zeros, as some converters write when they lose the geometry."""
    image = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4))
    block = bytearray(image.to_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(block[:348])))
    header["qform_code"], header["sform_code"] = 0, 2
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    block[:348] = header.binaryblock
    return gzip.compress(bytes(block))


def voxels_10_m_apart() -> bytes:
    """A small head whose slices the header puts 10 m apart: the axial grid would need a slice per grid spacing of 190 m."""
    data = np.zeros((20, 20, 20), np.int16)
    data[5:15, 5:15, 5:15] = 100
    return gzip.compress(nib.Nifti1Image(data, np.diag([1.0, 1.0, 10_000.0, 1.0])).to_bytes())


# name -> (file name (contrast T1), bytes, what the error says)
HOSTILE = {
    "header-2000-cubed": ("IXI801-Guys-0801-T1.nii.gz", lambda: gzip.compress(nifti_header((2000, 2000, 2000))), "MAX_VOXELS"),
    "header-32767-cubed": ("IXI802-Guys-0802-T1.nii", lambda: nifti_header((32767, 32767, 32767)), "MAX_VOXELS"),
    "gzip-bomb-huge-claim": ("IXI803-Guys-0803-T1.nii.gz", lambda: gzip_of_zeros(nifti_header((1024, 1024, 512)), 512), "MAX_VOXELS"),
    "gzip-bomb-small-claim": ("IXI804-Guys-0804-T1.nii.gz", lambda: gzip_of_zeros(nifti_header((64, 64, 64)), 512), "all voxels are zero"),
    "uncompressed-claim-past-the-end": ("IXI805-Guys-0805-T1.nii", lambda: nifti_header((256, 256, 150)) + bytes(1000), "truncated"),
    "damaged-deflate": ("IXI806-Guys-0806-T1.nii.gz", damaged_deflate, "corrupt"),
    "garbage-datatype": ("IXI807-Guys-0807-T1.nii.gz", garbage_datatype, "NIfTI-1 header"),
    "text-named-nii": ("IXI808-Guys-0808-T1.nii", lambda: b"this is a text file, not a volume\n" * 20, "NIfTI-1"),
    "empty-nii": ("IXI809-Guys-0809-T1.nii", lambda: b"", "NIfTI-1"),
    "zero-affine": ("IXI810-Guys-0810-T1.nii.gz", zero_affine, "affine is degenerate"),
    "voxels-10-m-apart": ("IXI811-Guys-0811-T1.nii.gz", voxels_10_m_apart, "MAX_EXTENT_MM"),
}
IMAGES = {"png-30000-squared": ("bomb.png", lambda: png_claiming(30000, 30000), "MAX_IMAGE_PIXELS")}


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(IMAGES))
def test_the_loader_refuses_with_an_error_that_says_why(case, tmp_path):
    name, make, expect = {**HOSTILE, **IMAGES}[case]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(VolumeError, match=expect):
        (load_image if case in IMAGES else load_nifti)(read_file(path))


def test_a_volume_whose_only_finite_voxels_are_zero_is_named_for_both():
    volume = np.zeros((8, 8, 8), np.float32)
    volume[0, 0, 0] = np.inf
    with pytest.raises(VolumeError, match="all voxels are NaN, infinite or zero"):
        check_intensities(volume)


def test_no_hostile_file_costs_more_than_the_memory_bound(tmp_path):
    """Every file loaded in turn by one fresh process, whose peak RSS is measured (ru_maxrss of waited-for children,
    in KiB); the peak of all of them is below the bound, so each one is."""
    paths = []
    for name, make, _ in {**HOSTILE, **IMAGES}.values():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(make())
    load_all = ("import sys\nfrom shards.preprocess import *\nfor path in sys.argv[1:]:\n"
                "    try: (load_image if path.endswith('.png') else load_nifti)(read_file(path))\n"
                "    except VolumeError: pass\n    else: sys.exit(f'{path} loaded')")
    probe = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-c', *sys.argv[1:]], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kib = int(subprocess.run([sys.executable, "-c", probe, load_all, *map(str, paths)], cwd=ROOT, capture_output=True,
                                  text=True, check=True, timeout=300).stdout)
    assert peak_kib < MEMORY_BOUND_MB * 1024, f"peak RSS {peak_kib // 1024} MiB"


def test_a_file_larger_than_any_volume_is_refused_before_reading(tmp_path, monkeypatch):
    import shards.preprocess as preprocess

    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", 1000)
    (tmp_path / "big.nii").write_bytes(bytes(2000))
    with pytest.raises(VolumeError, match="MAX_FILE_BYTES"):
        preprocess.read_file(tmp_path / "big.nii")


@pytest.fixture(scope="module")
def hostile_folders(ixi_tars, tmp_path_factory):
    """NIfTI folders of the synthetic subjects, the T1 one also holding every hostile file."""
    root = tmp_path_factory.mktemp("hostile")
    for contrast in ("T1", "T2"):
        folder = root / contrast.lower()
        folder.mkdir()
        with tarfile.open(ixi_tars / f"IXI-{contrast}.tar") as tar:
            for member in tar.getmembers():
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    for name, make, _ in HOSTILE.values():
        (root / "t1" / name).write_bytes(make())
    return root


def peak_rss_mib(*args) -> tuple[subprocess.CompletedProcess, int]:
    """Run `python -m ARGS` from the repository root; its result and the peak RSS of it and its workers."""
    probe = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', *sys.argv[1:]]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    peak_kib, code = map(int, result.stderr.strip().splitlines()[-1].split())
    result.returncode = code
    return result, peak_kib // 1024


def test_pack_skips_and_names_every_hostile_file_and_finishes(hostile_folders):
    out = hostile_folders / "shards"
    result, peak = peak_rss_mib("shards", "pack", "--t1", hostile_folders / "t1", "--t2", hostile_folders / "t2", "--out", out,
                                "--size", 64, "--workers", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert peak < 2 * MEMORY_BOUND_MB, f"pack's peak RSS {peak} MiB"
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    for name, _, expect in HOSTILE.values():
        assert expect in reasons.get(name, ""), f"{name}: {reasons.get(name)}"
        assert f"skipped {hostile_folders / 't1' / name}" in result.stdout + result.stderr
    assert manifest["splits"]["train"]["slices"]["t1"] > 0 and not list(out.rglob("*.tmp"))


def test_translate_reports_each_hostile_file_and_translates_the_rest(hostile_folders, trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((hostile_folders / "t1").glob("IXI0*"))[0]
    (inputs / good.name).write_bytes(good.read_bytes())
    for name, make, _ in HOSTILE.values():
        (inputs / name).write_bytes(make())
    out = tmp_path / "out"
    result, peak = peak_rss_mib("train.translate", "--checkpoint", trained, "--direction", "t1-to-t2", "--input", inputs, "--output", out)
    assert result.returncode == 1 and peak < 2 * MEMORY_BOUND_MB, (peak, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for name, _, expect in HOSTILE.values():
        assert any(name in line and expect in line for line in errors), f"{name} not reported: {errors}"
    assert sorted(p.name for p in out.iterdir()) == [good.name.replace(".nii.gz", "_t1-to-t2.nii.gz")], "nothing partial"


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["pickle-payload", "truncated-weights", "truncated-generator", "truncated-info", "changed-width", "fresh-into-used"])
def test_the_trainer_refuses_a_hostile_or_damaged_run_folder_and_changes_nothing(case, trained, shards_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    checkpoint = rundir.list_checkpoints(run)[-1][1]
    marker = tmp_path / "pwned"
    expect = {"pickle-payload": "refusing to unpickle", "truncated-weights": "may be truncated", "truncated-generator": "may be truncated",
              "truncated-info": "unreadable checkpoint.json", "changed-width": "different configuration",
              "fresh-into-used": "already holds checkpoints"}[case]
    if case == "pickle-payload":
        torch.save(Payload(marker), checkpoint / "custom_checkpoint_0.pkl")
    elif case.startswith("truncated"):
        name = {"truncated-weights": "model.safetensors", "truncated-generator": rundir.GENERATORS["t2_to_t1"],
                "truncated-info": "checkpoint.json"}[case]
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["--data", shards_dir, "--out", run, *SMALL, "--max_steps", 50]
    args += {"fresh-into-used": [], "changed-width": ["--ngf", "8", "--resume", "auto"]}.get(case, ["--resume", "auto"])
    result = train(*args, check=False, timeout=180)
    assert result.returncode != 0 and expect in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()[-1]) < 600 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not marker.exists(), "the planted pickle ran"
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before, "a refused run changed the run folder (config.yaml, checkpoints)"


# 500 bytes whose two options each stand for 9^10 values once their nine nested aliases are expanded
BILLION_LAUGHS = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
                            *(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)), "lr: *a9", "ngf: *a9", ""])


@pytest.mark.parametrize("argv, expect", [
    (["--lr", "-1"], "--lr -1.0: must be above 0"), (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "0"], "--lr 0.0: must be above 0"), (["--beta1", "1.5"], "--beta1 1.5: must be below 1"),
    (["--lambda_cycle", "-1"], "--lambda_cycle -1.0: must be at least 0"),
    (["--batch_size", "100000"], "--batch_size 100000: must be at most 512"),
    (["--elastic", "0.1"], "--elastic 0.1: must be at most 0.04"),
    ("yaml-syntax", "line 2, column"), ("binary", "not a text file"), ("billion-laughs", "line 2: a YAML alias (*a0)"),
    ("huge", "more than the 1048576 a config file may have")])
def test_bad_options_and_config_files_are_one_line_errors(argv, expect, tmp_path, capsys):
    if argv == "yaml-syntax":
        (tmp_path / "c.yaml").write_text("lr: 1e-4\nngf: 32: 4\nseed: 1\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    elif argv == "binary":
        (tmp_path / "c.yaml").write_bytes(bytes(range(256)))
        argv = ["--config", str(tmp_path / "c.yaml")]
    elif argv in ("billion-laughs", "huge"):
        (tmp_path / "c.yaml").write_text(BILLION_LAUGHS if argv == "billion-laughs" else "# padding\n" * 200_000)
        argv = ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit):
        load_config(["--data", "d", "--out", "o", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert expect in err and ("c.yaml" in err or "--" in err), err


def rewrite_tar(path: Path, keep=lambda index, member: True, change=lambda member, data: data) -> None:
    """Rewrite a shard keeping the members `keep` picks, each member's bytes passed through `change`."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for index, (member, data) in enumerate(members):
            if keep(index, member):
                data = change(member, data)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.fixture
def damaged_shards(shards_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    return copy


def test_a_truncated_val_shard_is_an_error_naming_it_or_a_warning_with_allow_partial(damaged_shards, trained, tmp_path):
    shard = damaged_shards / "val" / "paired-000000.tar"
    with tarfile.open(shard) as tar:
        count = len(tar.getmembers())
    rewrite_tar(shard, keep=lambda index, member: index < count // 2 // 4 * 4)  # cut at a sample boundary: reads cleanly
    args = ["--data", damaged_shards, "--out", tmp_path / "run", *SMALL, "--max_steps", 2, "--checkpoint_every", 2]
    result = train(*args, check=False, timeout=180)
    assert result.returncode != 0 and f"{shard}: holds" in result.stderr and "records" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()
    result = train(*args, "--allow-partial", "true", timeout=300)
    assert "WARNING" in result.stdout + result.stderr and (tmp_path / "run" / "summary.json").exists()
    checkpoint = rundir.checkpoint_dir(trained, 40)
    evaluate = run_module("train.evaluate", "--checkpoint", checkpoint, "--data", damaged_shards / "val", "--out", tmp_path / "r",
                          check=False)
    assert evaluate.returncode != 0 and f"{shard}: holds" in evaluate.stderr and not (tmp_path / "r").exists()
    partial = run_module("train.evaluate", "--checkpoint", checkpoint, "--data", damaged_shards / "val", "--out", tmp_path / "r",
                         "--allow-partial")
    assert "WARNING" in partial.stderr and (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_first_sample_stops_start_up_with_its_shard_and_key(split, damaged_shards, tmp_path):
    shard = damaged_shards / split / ("t1-000000.tar" if split == "train" else "paired-000000.tar")
    rewrite_tar(shard, change=lambda member, data: b"not a png" if member.name.endswith("t1.png") else data)
    result = train("--data", damaged_shards, "--out", tmp_path / "run", *SMALL, "--max_steps", 2, check=False, timeout=180)
    assert result.returncode != 0 and f"{shard}: sample " in result.stderr and "unreadable" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.yaml").exists(), result.stderr[-3000:]


def test_a_manifest_nested_deeper_than_the_parser_goes_is_a_shards_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 200_000)
    with pytest.raises(ShardsError, match=r"manifest.json: not valid JSON \(RecursionError"):
        read_manifest(tmp_path)


SMALL_SLICE = encode_png16(np.full((32, 32), 0.5, np.float32))  # the shards' slices are 64x64


def test_train_slices_of_another_size_are_skipped_and_named(damaged_shards, tmp_path):
    """Every other T1 slice of the train shards is 32x32: each one read is skipped with a warning naming its shard
    and key, and counted, where a batch of two sizes stopped training deep inside the loss."""
    slices = itertools.count()
    for shard in (damaged_shards / "train").glob("t1-*.tar"):
        rewrite_tar(shard, change=lambda member, data: SMALL_SLICE if member.name.endswith("t1.png") and next(slices) % 2 else data)
    run = tmp_path / "run"
    result = train("--data", damaged_shards, "--out", run, *SMALL, "--max_steps", 4, "--checkpoint_every", 4, timeout=300)
    warnings = [line for line in result.stdout.splitlines() if "warning: skipping unreadable sample" in line]
    assert warnings and all(re.search(r"sample IXI\w+ in .*/train/t1-\d+\.tar: a 32x32 image where the slices are 64x64$", line)
                            for line in warnings), warnings[:3]
    assert json.loads((run / rundir.SUMMARY).read_text())["skipped_samples"] >= len(warnings)


@pytest.mark.parametrize("damage", ["another size", "not a png"])
def test_a_later_val_sample_of_another_size_or_damaged_is_an_error_naming_it(damage, damaged_shards, trained, tmp_path):
    """The trainer at start-up and train.evaluate: one line naming the shard and the sample, nothing written."""
    shard = damaged_shards / "val" / "paired-000000.tar"
    with tarfile.open(shard) as tar:
        key = [m.name for m in tar.getmembers() if m.name.endswith(".t2.png")][5].removesuffix(".t2.png")
    rewrite_tar(shard, change=lambda member, data: (SMALL_SLICE if damage == "another size" else b"not a png")
                if member.name == f"{key}.t2.png" else data)
    expect = f"{shard}: sample {key} is unreadable ("
    result = train("--data", damaged_shards, "--out", tmp_path / "run", *SMALL, "--max_steps", 2, check=False, timeout=180)
    assert result.returncode != 0 and expect in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()
    evaluate = run_module("train.evaluate", "--checkpoint", rundir.checkpoint_dir(trained, 40), "--data", damaged_shards / "val",
                          "--out", tmp_path / "report", check=False)
    assert evaluate.returncode != 0 and expect in evaluate.stderr and "Traceback" not in evaluate.stderr, evaluate.stderr[-2000:]
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("recorded, expect", [(128, "images are 64x64, but manifest.json's image_size is 128"),
                                               ("missing", "manifest.json: image_size None is not a size in pixels")])
def test_a_manifest_whose_image_size_is_not_its_slices_stops_start_up(recorded, expect, damaged_shards, tmp_path):
    """Without --size the trainer takes its size from the manifest: one that does not hold the slices' size
    skipped every sample as the wrong size (128) or stopped with a KeyError (missing)."""
    manifest = json.loads((damaged_shards / "manifest.json").read_text())
    if recorded == "missing":
        del manifest["image_size"]
    else:
        manifest["image_size"] = recorded
    (damaged_shards / "manifest.json").write_text(json.dumps(manifest))
    result = train("--data", damaged_shards, "--out", tmp_path / "run", *SMALL, "--max_steps", 2, check=False, timeout=180)
    assert result.returncode != 0 and expect in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_evaluate_overwrite_never_replaces_a_folder_it_did_not_write(trained, shards_dir, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    result = run_module("train.evaluate", "--checkpoint", trained, "--data", shards_dir / "val", "--out", mine, "--overwrite", check=False)
    assert result.returncode != 0 and "did not write (chapter1.tex)" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"] and (mine / "chapter1.tex").read_text() == "years of work"
    report = tmp_path / "report"
    run_module("train.evaluate", "--checkpoint", trained, "--data", shards_dir / "val", "--out", report)
    run_module("train.evaluate", "--checkpoint", trained, "--data", shards_dir / "val", "--out", report, "--overwrite")  # its own


def test_translate_output_under_a_regular_file_is_one_line_error(trained, tmp_path):
    (tmp_path / "afile").write_text("x")
    image = tmp_path / "slice.png"
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(image)
    result = run_module("train.translate", "--checkpoint", trained, "--direction", "t1-to-t2", "--input", image,
                        "--output", tmp_path / "afile" / "out", check=False)
    assert result.returncode != 0 and "--output" in result.stderr and "cannot create" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem: a checkpoint does not fit. Needs root (CI and the developers' machines are)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(small_disk, shards_dir):
    run = small_disk / "run"
    result = train("--data", shards_dir, "--out", run, *SMALL, "--max_steps", 2, "--checkpoint_every", 2, check=False, timeout=180)
    assert result.returncode != 0 and "no space left on device" in result.stderr and "step-2 checkpoint" in result.stderr, \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr.splitlines()[-1] and not list((run / "checkpoints").glob("*")), "no partial checkpoint"
