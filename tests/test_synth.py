import gzip
import re
import tarfile

import nibabel as nib
import numpy as np
import pytest

from shards.phantom import CSF, GM, WM, Anatomy, tissue_labels
from shards.synth import GEOMETRY, grid, render_subject, subjects

IXI = re.compile(r"^IXI\d{3}-(Guys|HH|IOP)-\d{4}-(T1|T2)\.nii\.gz$")


def _load(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_tars_use_ixi_names_and_miss_a_few_contrasts(ixi_tars):
    names = {c: tarfile.open(ixi_tars / f"IXI-{c}.tar").getnames() for c in ("T1", "T2")}
    for contrast, members in names.items():
        assert members and all(IXI.match(n) and n.endswith(f"-{contrast}.nii.gz") for n in members), members
    ids = {c: {n.split("-")[0] for n in members} for c, members in names.items()}
    assert ids["T1"] - ids["T2"] and ids["T2"] - ids["T1"], "IXI has subjects with only one contrast"
    assert len(ids["T1"] | ids["T2"]) == 10


def test_ixi_geometry_full_size():
    for contrast, codes in (("T1", ("P", "I", "R")), ("T2", ("L", "P", "S"))):
        shape, affine = grid(contrast)
        assert shape == GEOMETRY[contrast][0]
        assert np.allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), GEOMETRY[contrast][1])
        assert nib.aff2axcodes(affine) == codes
    assert grid("T1")[0] == (256, 256, 150)
    # T1 is sagittal: its slice axis (the 1.2 mm one) runs left-right
    assert abs(grid("T1")[1][0, 2]) == pytest.approx(1.2)


def test_rendered_headers_match_geometry_and_are_deterministic():
    subject = subjects(3, seed=5)[0]
    first, again = render_subject(subject, 5, 4), render_subject(subject, 5, 4)
    assert first == again
    for contrast, data in first.items():
        image = _load(data)
        shape, affine = grid(contrast, 4)
        assert image.shape == shape and np.allclose(image.affine, affine)
        assert image.get_data_dtype() == np.int16


def _tissue_means(contrast: str, site: str):
    subject = subjects(3, seed=2)[0]
    rng = np.random.default_rng([2, subject.number])
    anatomy = Anatomy.random(rng)
    data = _load(render_subject(subject.__class__(subject.number, site, 1, (contrast,)), 2, 2)[contrast])
    shape, affine = grid(contrast, 2)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    labels = tissue_labels(ijk @ affine[:3, :3].T + affine[:3, 3], anatomy).reshape(shape)
    values = np.asarray(data.dataobj, np.float32)
    return {t: values[labels == t].mean() for t in (CSF, GM, WM)}


def test_tissue_contrast_follows_t1_and_t2_weighting():
    t1, t2 = _tissue_means("T1", "Guys"), _tissue_means("T2", "Guys")
    assert t1[WM] > t1[GM] > t1[CSF]
    assert t2[CSF] > t2[GM] > t2[WM]


def test_sites_differ_in_intensity():
    guys, hh = _tissue_means("T1", "Guys"), _tissue_means("T1", "HH")
    assert hh[WM] / guys[WM] > 1.3


def test_t1_and_t2_share_one_anatomy_in_world_coordinates():
    subject = next(s for s in subjects(6, seed=3) if s.contrasts == ("T1", "T2"))
    images = {c: nib.as_closest_canonical(_load(d)) for c, d in render_subject(subject, 3, 2).items()}
    centres = {}
    for contrast, image in images.items():
        data = image.get_fdata()
        brain = data > 0.3 * np.percentile(data, 99)
        centres[contrast] = image.affine[:3, :3] @ np.argwhere(brain).mean(0) + image.affine[:3, 3]
    # T2 covers less of the neck, so compare in-plane (x, y) centres of the bright tissue
    assert np.allclose(centres["T1"][:2], centres["T2"][:2], atol=4.0), centres
