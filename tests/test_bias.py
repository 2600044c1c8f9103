"""pack --bias-correction n4: it flattens the phantom's known bias fields, and inference applies exactly what
the shards had."""

from __future__ import annotations

import copy
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from scipy import ndimage

from conftest import run_module
from shards.bias import correct_n4
from shards.format import decode_sample, read_manifest, shard_paths
from shards.phantom import SITES, WM, bias_field, render, tissue_volume, voxel_world
from shards.preprocess import foreground, load_nifti
from shards.synth import grid, subject_anatomy, subjects
from train import rundir
from train.inference import prepare_volume


@pytest.mark.parametrize("site", ["Guys", "HH", "IOP"])
def test_n4_removes_most_of_the_known_bias_field_inside_white_matter(site):
    subject = next(s for s in subjects(40, 0) if s.site == site)
    rng = np.random.default_rng([0, subject.number])
    anatomy = subject_anatomy(subject, rng, 0)
    shape, affine = grid("T1", 2)
    labels = tissue_volume(anatomy, shape, affine)
    field_rng = copy.deepcopy(rng)  # render draws the field's coefficients first: the same draw gives the true field
    image = render(labels, "T1", site, affine, rng, voxels_averaged=8).astype(np.float32)
    field = bias_field(voxel_world(shape, affine, slice(None)), field_rng.normal(scale=SITES[site]["bias"], size=9))
    corrected = correct_n4(image, affine, foreground(image))
    white = ndimage.binary_erosion(labels == WM, iterations=1)  # away from partial volume
    spread = lambda a: float(a.std() / a.mean())
    left = field[white] * corrected[white] / image[white]  # the true field that N4 did not divide out (noise cancels)
    field = field[white]
    assert corrected.dtype == np.float32 and spread(left) < 0.5 * spread(field), (spread(field), spread(left))


@pytest.fixture(scope="module")
def n4_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("n4")
    run_module("shards", "synth", "--out", root / "ixi", "--subjects", 4, "--seed", 2, "--downsample", 4)
    run_module("shards", "pack", "--t1", root / "ixi" / "IXI-T1.tar", "--t2", root / "ixi" / "IXI-T2.tar", "--out", root / "shards",
               "--size", 64, "--workers", 2, "--bias-correction", "n4", "--split", "0.5,0.25,0.25")
    return root


def test_inference_prepares_a_volume_exactly_as_the_n4_shards_were_made(n4_shards):
    manifest = read_manifest(n4_shards / "shards")
    assert manifest["options"]["bias_correction"] == "n4"
    preprocessing = {"size": 64, "fov_mm": manifest["options"]["fov_mm"], "bias_correction": "n4"}
    subject = manifest["splits"]["train"]["subjects"][0]
    with tarfile.open(n4_shards / "ixi" / "IXI-T1.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(subject))
        data, affine, _ = load_nifti(tar.extractfile(member).read())
    packed = {json.loads(s["json"])["slice"]: decode_sample(s)["t1"] for s in wds.WebDataset(shard_paths(n4_shards / "shards", "train", "t1"),
                                                                                               shardshuffle=False, empty_check=False)
              if json.loads(s["json"])["subject"] == subject}
    for corrected, tolerance in (("n4", 1.5 / 65535), ("none", None)):
        prepared = prepare_volume(data, affine, {**preprocessing, "bias_correction": corrected})
        images = dict(zip(prepared.planes.tolist(), prepared.images))
        masks = prepared.image_masks  # the dashboard's head mask for each slice of an uploaded volume
        assert masks.shape == prepared.images.shape and masks.any(axis=(1, 2)).all() and not prepared.images[~masks].any()
        assert packed and set(packed) <= set(images)
        difference = max(float(np.abs(images[z] - image).max()) for z, image in packed.items())
        if tolerance:
            assert difference <= tolerance  # the 16-bit PNG's rounding, nothing else
        else:
            assert difference > 0.01  # without the correction the slices are measurably different


def test_checkpoints_record_the_bias_correction_their_shards_had(trained, shards_dir):
    info = json.loads((rundir.checkpoint_dir(trained, 40) / rundir.CHECKPOINT_INFO).read_text())
    assert info["preprocessing"]["bias_correction"] == read_manifest(shards_dir)["options"]["bias_correction"] == "none"
