"""shards pack / inspect: the shard contract, subject splits, every source kind, bad input and resume."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT, run_module
from shards.format import decode_png16, decode_sample, encode_png16, read_manifest, shard_paths, shards_preprocessing
import shards.pack
from shards.pack import PackOptions, pack
from shards.preprocess import Grid, _sample_3d, _source_axes, foreground, load_image, normalize, resample, standardize_image
from shards.sources import list_source, load_ref
from train.inference import prepare_volume
from shards.format import ShardsError
from shards.head import head_threshold

OPTS = PackOptions(size=64, shard_size=100)


def _samples(root, split, stream):
    paths = shard_paths(root, split, stream)
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False)) if paths else []


def test_manifest_and_layout(shards_dir):
    manifest = read_manifest(shards_dir)
    assert manifest["image_size"] == 64 and manifest["skipped"] == []
    assert set(manifest["splits"]) == {"train", "val", "test"}
    assert len(manifest["files"]) == 18 and all(len(f["md5"]) == 32 for f in manifest["files"])
    for split, streams in (("train", ("t1", "t2")), ("val", ("paired",)), ("test", ("paired",))):
        for stream in streams:
            names = manifest["splits"][split]["shards"][stream]
            assert names and [Path(p).name for p in shard_paths(shards_dir, split, stream)] == names
            assert manifest["splits"][split]["slices"][stream] == len(_samples(shards_dir, split, stream))
    assert not list(shards_dir.rglob("*.tmp")) and not (shards_dir / ".pack-state.json").exists()


def test_splits_are_by_subject_and_val_test_are_paired(shards_dir):
    manifest = read_manifest(shards_dir)
    subjects = {split: set(info["subjects"]) for split, info in manifest["splits"].items()}
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"] and not subjects["val"] & subjects["test"]
    assert subjects["val"] and subjects["test"]
    for split in ("train", "val", "test"):
        streams = ("t1", "t2") if split == "train" else ("paired",)
        seen = {json.loads(s["json"])["subject"] for stream in streams for s in _samples(shards_dir, split, stream)}
        assert seen == subjects[split]


def test_plain_webdataset_reads_the_contract(shards_dir):
    train = _samples(shards_dir, "train", "t1")
    sample = train[0]
    assert set(sample) >= {"__key__", "t1.png", "json"} and "t2.png" not in sample
    meta = json.loads(sample["json"])
    assert sample["__key__"] == f"{meta['subject']}_z{meta['slice']:03d}"
    assert set(meta) >= {"subject", "site", "contrasts", "slice", "spacing_mm", "normalization"}
    image = np.asarray(Image.open(io.BytesIO(sample["t1.png"])))
    assert image.dtype == np.uint16 and image.shape == (64, 64)
    paired = _samples(shards_dir, "val", "paired")[len(_samples(shards_dir, "val", "paired")) // 2]
    assert {"t1.png", "t2.png", "mask.png"} <= set(paired)


def test_slices_are_plain_pngs_that_pillow_decodes_exactly_and_compress_like_pillows(shards_dir):
    from shards.format import encode_mask
    paired = [decode_sample(s) for s in _samples(shards_dir, "val", "paired")]
    ours = pillows = 0
    for sample in paired:
        encoded, scaled = encode_png16(sample["t1"]), np.round(sample["t1"] * 65535).astype(np.uint16)
        with Image.open(io.BytesIO(encoded)) as im:
            assert im.format == "PNG" and im.mode == "I;16"
            assert np.array_equal(np.asarray(im), scaled)
        buf = io.BytesIO()
        Image.fromarray(scaled).save(buf, format="PNG", compress_level=1)
        ours, pillows = ours + len(encoded), pillows + len(buf.getvalue())
        with Image.open(io.BytesIO(encode_mask(sample["mask"]))) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), sample["mask"].astype(np.uint8) * 255)
    assert ours < 1.05 * pillows, f"the fast encoder's shards are {ours / pillows:.2f}x Pillow's size"


def test_paired_slices_are_aligned_16_bit_and_normalized(shards_dir):
    decoded = [decode_sample(s) for s in _samples(shards_dir, "val", "paired")]
    mid = decoded[len(decoded) // 2]
    assert len(np.unique(mid["t1"])) > 256, "16-bit precision kept"
    assert 0.0 <= mid["t1"].min() and mid["t1"].max() <= 1.0 and mid["t1"].max() > 0.99
    # contrasts differ but the anatomy lines up: the head outlines coincide
    heads = [mid[c] > 0.05 for c in ("t1", "t2")]
    dice = 2 * (heads[0] & heads[1]).sum() / (heads[0].sum() + heads[1].sum())
    assert dice > 0.9 and mid["mask"].sum() > 0.2 * mid["mask"].size
    # T1 and T2 are inversely related inside the brain (WM bright on T1, dark on T2)
    assert np.corrcoef(mid["t1"][mid["mask"]], mid["t2"][mid["mask"]])[0, 1] < 0.5


def test_split_is_deterministic_for_a_seed(ixi_tars, tmp_path):
    from shards.pack import plan
    from shards.sources import list_source

    t1, _ = list_source(ixi_tars / "IXI-T1.tar", "t1")
    t2, _ = list_source(ixi_tars / "IXI-T2.tar", "t2")
    a, b, c = plan(t1, t2, OPTS)[1], plan(t1, t2, OPTS)[1], plan(t1, t2, PackOptions(size=64, seed=7))[1]
    assert a == b and a != c


def ramp_volume():
    """A volume whose value is a linear function of its voxel index, which trilinear sampling reproduces exactly,
    under an IXI-like header: axes permuted (PIR), one flipped, anisotropic voxels, off-centre."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (40, 36, 30)), indexing="ij")
    affine = np.array([[0, 0, -1.2, 30], [-0.94, 0, 0, 20], [0, 0.94, 0, -15], [0, 0, 0, 1]], float)
    return 1 + i + 2 * j + 3 * k, affine


def test_resampling_along_the_volumes_axes_is_trilinear_and_zero_outside():
    data, affine = ramp_volume()
    grid = Grid((48, 44, 50), np.array([[1, 0, 0, -24], [0, 1, 0, -25], [0, 0, 1, -20], [0, 0, 0, 1]], float))  # past every side
    to_source = np.linalg.inv(affine) @ grid.affine
    assert _source_axes(to_source[:3, :3]) is not None  # the separable path
    out = resample(data, affine, grid)
    g = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), -1).reshape(-1, 3)
    ijk = g @ to_source[:3, :3].T + to_source[:3, 3]
    within = np.all((ijk >= 0) & (ijk <= np.array(data.shape) - 1), axis=1)
    assert 0.2 < within.mean() < 0.9
    np.testing.assert_allclose(out.reshape(-1)[within], (1 + ijk @ [1, 2, 3])[within], rtol=1e-5)
    far = np.any((ijk < -1) | (ijk > np.array(data.shape)), axis=1)
    assert far.any() and (out.reshape(-1)[far] == 0).all()
    # edges included, the one-axis-at-a-time result is the 3D sampling's
    np.testing.assert_allclose(out, _sample_3d(data, to_source, grid.shape), rtol=2e-5, atol=1e-4)  # its float32 coordinates


def test_an_oblique_grid_is_sampled_in_3d():
    data, affine = ramp_volume()
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0, -10], [np.sin(angle), np.cos(angle), 0, -10], [0, 0, 1, -10], [0, 0, 0, 1]])
    grid = Grid((20, 20, 20), rotation)
    to_source = np.linalg.inv(affine) @ grid.affine
    assert _source_axes(to_source[:3, :3]) is None
    out = resample(data, affine, grid)
    g = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), -1).reshape(-1, 3)
    ijk = g @ to_source[:3, :3].T + to_source[:3, 3]
    within = np.all((ijk >= 0) & (ijk <= np.array(data.shape) - 1), axis=1)
    assert within.mean() > 0.5
    np.testing.assert_allclose(out.reshape(-1)[within], (1 + ijk @ [1, 2, 3])[within], rtol=1e-4)


def test_nifti_folders_and_inspect(ixi_tars, tmp_path):
    for contrast in ("T1", "T2"):
        folder = tmp_path / contrast
        folder.mkdir()
        with tarfile.open(ixi_tars / f"IXI-{contrast}.tar") as tar:
            for member in tar.getmembers()[:5]:
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    out = tmp_path / "out"
    manifest = pack(tmp_path / "T1", tmp_path / "T2", out, OPTS, workers=1, progress=False)
    assert manifest["splits"]["train"]["slices"]["t1"] > 0
    result = run_module("shards", "inspect", out, "--png", tmp_path / "sheet.png")
    assert "train" in result.stdout and "skipped: 0" in result.stdout
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] == 8 * 96 and sheet.size[1] >= 3 * 96


def _png(path: Path, array: np.ndarray, mode="RGB"):
    Image.fromarray(np.repeat(array[:, :, None], 3, 2) if mode == "RGB" else array).save(path)


def _slice_like(h=217, w=181, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    head = ((yy - h / 2) / (h * 0.4)) ** 2 + ((xx - w / 2) / (w * 0.4)) ** 2 < 1
    return (head * (120 + 60 * np.sin(xx / 7.0 + seed)) + rng.normal(0, 3, (h, w)).clip(0)).clip(0, 255).astype(np.uint8)


def test_image_folders_like_the_seed_dataset(tmp_path):
    """Unpaired 217x181 RGB PNGs (the seed's format), plus a grayscale JPG and a TIFF, and a stray text file."""
    for contrast in ("t1", "t2"):
        folder = tmp_path / contrast
        folder.mkdir()
        for i in range(6):
            _png(folder / f"{contrast}_{i:03d}.png", _slice_like(seed=i))
        Image.fromarray(_slice_like(seed=9)).save(folder / f"{contrast}_gray.jpg")
        Image.fromarray(_slice_like(120, 100, seed=3)).save(folder / f"{contrast}_small.tif")
    (tmp_path / "t1" / "notes.txt").write_text("not an image")
    (tmp_path / "t1" / "broken.png").write_bytes(b"not a png at all")
    manifest = pack(tmp_path / "t1", tmp_path / "t2", tmp_path / "out", OPTS, workers=1, progress=False)
    assert manifest["splits"]["train"]["slices"] == {"t1": 8, "t2": 8}
    assert manifest["splits"]["val"]["slices"] == {"paired": 0}, "unpaired names give no paired subjects"
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert "notes.txt" in reasons and "not a NIfTI" in reasons["notes.txt"]
    assert "broken.png" in reasons and "not a readable image" in reasons["broken.png"]
    sample = decode_sample(_samples(tmp_path / "out", "train", "t1")[0])
    assert sample["t1"].shape == (64, 64) and sample["t1"].max() > 0.99
    for raw in _samples(tmp_path / "out", "train", "t1"):  # as translate and the dashboard prepare the same file
        sample = decode_sample(raw)
        prepared, _, _ = standardize_image(load_image((tmp_path / "t1" / sample["meta"]["source"]).read_bytes()), 64)
        assert np.array_equal(decode_png16(encode_png16(prepared)), sample["t1"]), sample["key"]


def test_a_packed_volume_and_the_same_volume_prepared_for_translation_give_the_same_slices(ixi_tars, shards_dir):
    """One preprocessing path: shards pack and train.translate / the dashboard (prepare_volume) agree to the bit."""
    manifest = read_manifest(shards_dir)
    refs = {ref.subject: ref for ref in list_source(ixi_tars / "IXI-T1.tar", "t1")[0]}
    samples = [decode_sample(raw) for raw in _samples(shards_dir, "train", "t1")]
    subjects = sorted({s["meta"]["subject"] for s in samples})[:2]
    for subject in subjects:
        (data, affine, _), _ = load_ref(refs[subject])
        prepared = prepare_volume(data, affine, shards_preprocessing(manifest))
        planes = list(prepared.planes)
        packed = [s for s in samples if s["meta"]["subject"] == subject]
        assert len(packed) > 5
        for sample in packed:
            image = prepared.images[planes.index(sample["meta"]["slice"])]
            assert np.array_equal(decode_png16(encode_png16(image)), sample["t1"]), sample["key"]


def _nii_gz(data, affine=None) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes())


@pytest.fixture
def mixed_folder(ixi_tars, tmp_path):
    """A NIfTI folder with good volumes and one of each kind of bad volume."""
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    for contrast, folder in (("T1", t1), ("T2", t2)):
        folder.mkdir()
        with tarfile.open(ixi_tars / f"IXI-{contrast}.tar") as tar:
            for member in tar.getmembers():
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    good = next(t1.iterdir()).read_bytes()
    (t1 / "IXI901-Guys-0001-T1.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    (t1 / "IXI902-Guys-0002-T1.nii.gz").write_bytes(b"\x1f\x8b garbage")  # corrupt
    (t1 / "IXI903-HH-0003-T1.nii.gz").write_bytes(_nii_gz(np.ones((8, 8, 8, 3), np.float32)))  # 4D
    (t1 / "IXI904-HH-0004-T1.nii.gz").write_bytes(_nii_gz(np.zeros((8, 8, 8), np.float32)))  # all zero
    (t1 / "IXI905-IOP-0005-T1.nii.gz").write_bytes(_nii_gz(np.full((8, 8, 8), np.nan, np.float32)))  # NaN
    (t1 / "brain_scan_final.nii.gz").write_bytes(good)  # unknown name pattern
    return t1, t2


def test_bad_volumes_are_skipped_listed_and_named(mixed_folder, tmp_path):
    t1, t2 = mixed_folder
    result = run_module("shards", "pack", "--t1", t1, "--t2", t2, "--out", tmp_path / "out", "--size", 64, "--workers", 2)
    manifest = read_manifest(tmp_path / "out")
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert "truncated" in reasons["IXI901-Guys-0001-T1.nii.gz"] or "corrupt" in reasons["IXI901-Guys-0001-T1.nii.gz"]
    assert "corrupt" in reasons["IXI902-Guys-0002-T1.nii.gz"]
    assert "4D" in reasons["IXI903-HH-0003-T1.nii.gz"]
    assert "zero" in reasons["IXI904-HH-0004-T1.nii.gz"]
    assert "NaN" in reasons["IXI905-IOP-0005-T1.nii.gz"]
    assert "unknown file-name pattern" in reasons["brain_scan_final.nii.gz"]
    assert "skipped IXI90" in result.stderr or "IXI90" in result.stdout + result.stderr  # said to the user too
    strict = run_module("shards", "pack", "--t1", t1, "--t2", t2, "--out", tmp_path / "strict", "--size", 64, "--strict", check=False)
    assert strict.returncode != 0 and "--strict" in strict.stderr


def test_truncated_tar_keeps_the_good_members(ixi_tars, tmp_path):
    data = (ixi_tars / "IXI-T1.tar").read_bytes()
    (tmp_path / "IXI-T1.tar").write_bytes(data[: int(len(data) * 0.7)])
    manifest = pack(tmp_path / "IXI-T1.tar", ixi_tars / "IXI-T2.tar", tmp_path / "out", OPTS, workers=2, progress=False)
    assert any("truncated" in s["reason"] for s in manifest["skipped"])
    assert manifest["splits"]["train"]["slices"]["t1"] > 0


def test_empty_source_and_nothing_usable_fail(tmp_path, ixi_tars):
    (tmp_path / "empty").mkdir()
    result = run_module("shards", "pack", "--t1", tmp_path / "empty", "--t2", ixi_tars / "IXI-T2.tar", "--out", tmp_path / "o", check=False)
    assert result.returncode == 1 and "empty" in result.stderr and "no usable T1" in result.stderr
    (tmp_path / "zeros").mkdir()
    (tmp_path / "zeros" / "IXI001-HH-0001-T1.nii.gz").write_bytes(_nii_gz(np.zeros((8, 8, 8), np.float32)))
    result = run_module("shards", "pack", "--t1", tmp_path / "zeros", "--t2", ixi_tars / "IXI-T2.tar", "--out", tmp_path / "o2",
                        "--size", 64, check=False)
    assert result.returncode == 1 and "nothing usable" in result.stderr


def test_output_folder_with_shards_is_refused(shards_dir):
    result = run_module("shards", "pack", "--t1", "x", "--t2", "y", "--out", shards_dir, check=False)
    assert result.returncode == 1  # sources are checked first; now with real sources:
    with pytest.raises(ShardsError, match="already"):
        t1 = read_manifest(shards_dir)["sources"]["t1"]
        pack(t1, read_manifest(shards_dir)["sources"]["t2"], shards_dir, OPTS, progress=False)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def test_interrupted_pack_resumes_to_the_same_shards(ixi_tars, tmp_path):
    args = ["--t1", ixi_tars / "IXI-T1.tar", "--t2", ixi_tars / "IXI-T2.tar", "--size", 64, "--shard-size", 10, "--workers", 1]
    reference = tmp_path / "ref"
    run_module("shards", "pack", *args, "--out", reference)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "shards", "pack", *map(str, args), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train/t1-*.tar"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the end"
    left = []  # its worker dies with it, not blocked forever on a pipe to it
    for _ in range(100):
        left = [p for p in Path("/proc").glob("[0-9]*") if str(out).encode() in _cmdline(p)]
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"workers left behind: {left}"
    for tar in out.glob("*/*.tar"):  # every file with a shard's name is complete
        tarfile.open(tar).getmembers()
    refused = run_module("shards", "pack", *args, "--out", out, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    run_module("shards", "pack", *args, "--out", out, "--resume")
    def keys(root):
        return sorted(s["__key__"] for split in ("train", "val", "test") for stream in ("t1", "t2", "paired") for s in _samples(root, split, stream))
    assert keys(out) == keys(reference)
    assert read_manifest(out)["splits"] == read_manifest(reference)["splits"]


def test_every_shards_option_says_what_it_does():
    from shards.__main__ import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"python -m shards {name} {action.option_strings or action.dest}: no help text"
                assert "(default: None)" not in action.help


def test_the_head_mask_fills_each_slices_holes_and_keeps_the_largest_component_wherever_the_head_lies():
    """foreground() labels only the head's bounding box; it must equal the whole-volume definition, written here
    with other scipy calls: holes filled slice by slice, then the largest 3D component."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((40, 36, 12)), 2) > 0.52  # components, holes, some touching the edges
    volume = np.zeros((40, 36, 12), np.float32)
    volume[blobs] = 100 + rng.random(blobs.sum())
    head = np.zeros((40, 36, 12), np.float32)
    head[3:30, 5:33, 2:9] = 100
    head[10:20, 12:25, :] = 0  # a hole in every slice, and open at the volume's top and bottom
    head[34:38, 1:4, 4] = 90  # a speck apart
    edge = np.zeros((40, 36, 12), np.float32)
    edge[:, :, 3:10] = 100  # the whole slice: no ring to pad
    edge[15:25, 15:25, 5] = 0
    for data in (volume, head, edge, np.zeros((8, 8, 4), np.float32)):
        bright = data > head_threshold(data)
        filled = np.stack([ndimage.binary_fill_holes(bright[:, :, z]) for z in range(bright.shape[2])], axis=2)
        labels, count = ndimage.label(filled)
        expected = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count else filled
        np.testing.assert_array_equal(foreground(data), expected)
    assert foreground(head)[15, 18, 5] and foreground(head)[15, 18, 0] == 0  # a hole filled, air above the head kept
    assert not foreground(head)[35, 2, 4] and foreground(edge)[20, 20, 5]


def test_normalization_scales_the_foreground_percentiles_to_0_and_1_in_float32():
    data = np.linspace(0, 1000, 8000, dtype=np.float32).reshape(20, 20, 20)
    mask = np.zeros_like(data, bool)
    mask[5:15] = True
    scaled, record = normalize(data, mask)
    low, high = np.percentile(data[mask], record["percentiles"])
    expected = np.clip((data.astype(np.float64) - low) / (high - low), 0, 1)
    assert scaled.dtype == np.float32 and np.abs(scaled - expected).max() < 1e-6
    assert (record["low"], record["high"]) == (low, high)


def run_pack_worker_initializer(before: str, after: str) -> str:
    """What a fresh interpreter prints after running `before`, the pack workers' initializer, then `after`."""
    code = f"import numpy as np; {before}import os; from shards.pack import _init_worker; _init_worker(os.getppid()); {after}"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pack_workers_turn_off_numpys_huge_page_advice():
    # huge pages doubled the workers' system time (docs/benchmarks.md); numpy's setter returns the previous value
    assert run_pack_worker_initializer("", "print(np._core.multiarray._set_madvise_hugepage(True))") == "False"


def test_pack_workers_start_on_a_numpy_without_the_huge_page_switch():
    assert run_pack_worker_initializer("del np._core.multiarray._set_madvise_hugepage; ", "print('started')") == "started"


def test_at_most_two_subjects_per_worker_are_in_flight(ixi_tars, tmp_path, monkeypatch):
    """The bound that keeps packing's memory flat however many subjects there are."""
    in_flight, peak = [0], [0]

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            in_flight[0] -= 1
            return self.value

    class InProcessPool:  # runs each task as it is submitted, and counts tasks whose results are not yet written
        def __init__(self, max_workers, initializer, initargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            return Done(fn(*args))

    monkeypatch.setattr(shards.pack, "ProcessPoolExecutor", InProcessPool)
    manifest = pack(ixi_tars / "IXI-T1.tar", ixi_tars / "IXI-T2.tar", tmp_path / "out", OPTS, workers=2, progress=False)
    assert manifest["timing"]["volumes"] > 4 and (peak[0], in_flight[0]) == (4, 0)
