"""Every dashboard page under streamlit.testing.AppTest, on a runs folder with a finished, a crashed and a broken
run; the path guard; and one end-to-end run in a real headless Chromium (Playwright)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import streamlit as st
import yaml
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import ROOT
from test_dicom import write_series
from test_hostile_input import BILLION_LAUGHS, HOSTILE
from dashboard import runs as R
from dashboard.screenshots import screenshots, serve
from train import rundir
from train.data import val_samples


@pytest.fixture(scope="module")
def runs_root(trained, shards_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dash") / "runs"
    shutil.copytree(trained, root / "base")
    crashed = root / "crashed"
    shutil.copytree(trained, crashed)
    (crashed / rundir.SUMMARY).unlink()
    os.utime(crashed / rundir.METRICS, (1e9, 1e9))  # long silent: not running
    config = yaml.safe_load((crashed / rundir.CONFIG).read_text())
    (crashed / rundir.CONFIG).write_text(yaml.safe_dump({**config, "lr": 0.001}))
    for path in crashed.glob("checkpoints/*/G_*.safetensors"):
        path.write_bytes(b"not safetensors")
    partner = root / "partner"  # the same run at its other kept checkpoint: a second ensemble member
    shutil.copytree(trained, partner)
    summary = json.loads((partner / rundir.SUMMARY).read_text())
    other = next(step for step, _ in rundir.list_checkpoints(partner) if step != summary["best_checkpoint_step"])
    (partner / rundir.SUMMARY).write_text(json.dumps({**summary, "best_checkpoint_step": other}))
    broken = root / "broken"
    broken.mkdir()
    (broken / rundir.CONFIG).write_text("size: [unclosed\n")
    (root / "empty-folder").mkdir()
    return root


@pytest.fixture
def app(runs_root, shards_dir, monkeypatch):
    monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(runs_root))
    monkeypatch.setenv("MRI_CYCLEGAN_DATA", str(shards_dir.parent))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    return at.run()


def go(at, page, run=None):
    at.sidebar.radio(key="page").set_value(page).run()
    if run:
        at.sidebar.selectbox(key="run").set_value(run).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_link_opens_the_view_it_names_and_the_address_follows_the_view(runs_root, shards_dir, monkeypatch):
    monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(runs_root))
    monkeypatch.setenv("MRI_CYCLEGAN_DATA", str(shards_dir.parent))
    first = rundir.list_checkpoints(runs_root / "partner")[0][0]
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.query_params.update(page="Translate", run="partner", step=str(first))
    at.run()
    assert not at.exception
    assert (at.sidebar.radio(key="page").value, at.sidebar.selectbox(key="run").value) == ("Translate", "partner")
    assert at.selectbox(key="checkpoint").value.step == first
    go(at, "Run", "base")
    assert dict(at.query_params) == {"page": ["Run"], "run": ["base"]} or dict(at.query_params) == {"page": "Run", "run": "base"}


def test_runs_page_lists_every_run_with_status_and_scores(app):
    assert not app.exception
    table = app.dataframe[0].value.set_index("run")
    assert list(table.columns[:5]) == ["status", "steps", "total", "best SSIM", "best step"], "scores before settings"
    assert table.loc["base", "status"] == "finished" and table.loc["base", "steps"] == 40
    assert table.loc["crashed", "status"] == "crashed" and table.loc["broken", "status"] == "broken"
    assert -1 <= table.loc["base", "best SSIM"] <= 1 and table.loc["base", "lr"] == 0.0005
    warnings = " ".join(w.value for w in app.warning)
    assert "broken" in warnings and "empty-folder" in warnings and "base:" not in warnings


def titled_charts(at) -> dict[str, pd.DataFrame | None]:
    """Each bold title on the page and the data of the line chart right under it (None: no chart there). AppTest
    keeps a chart's data as an Arrow stream in its proto."""
    found, title = {}, None

    def walk(node):
        nonlocal title
        for element in getattr(node, "children", {}).values():
            if element.type == "markdown" and element.value.startswith("**") and element.value.endswith("**"):
                title = element.value.strip("*")
                found[title] = None
            elif element.type == "vega_lite_chart" and title:
                found[title] = pa.ipc.open_stream(element.proto.datasets[0].data.data).read_all().to_pandas()
                title = None
            walk(element)

    walk(at.main)
    return found


def test_compare_page_overlays_curves_diffs_configs_and_exports(app, runs_root):
    at = go(app, "Compare")
    at.multiselect(key="compare_runs").set_value(["base", "crashed"]).run()
    charts = titled_charts(at)
    assert len(charts) == 8 and all(data is not None for data in charts.values()), "a few combined charts, not one per metric"
    for title in ("Masked SSIM", "Brightness (1 = the truth's mean inside the head)"):
        assert set(charts[title]["series"]) == {f"{run} · {d}" for run in ("base", "crashed") for d in ("T1→T2", "T2→T1")}, title
    logged = rundir.read_metrics(runs_root / "base")
    every_loss = {n for n in rundir.LOSSES if any(row.get(f"loss/{n}") for row in logged)}  # each loss that is not zero throughout
    losses = {s.split(" · ")[1] for title in ("Generator losses", "Discriminator losses") for s in charts[title]["series"]}
    assert losses == every_loss and {"D_t1", "D_t2", "cycle"} <= losses
    assert set(charts["Gradient norms (largest per logged row)"]["series"]) == {f"{run} · {n}" for run in ("base", "crashed")
                                                                            for n in ("G", "D")}
    diff = at.dataframe[0].value
    assert list(diff["option"]) == ["lr"] and list(diff["crashed"]) == ["0.001"]
    assert at.get("download_button")[0].proto.label.startswith("Download the comparison")
    assert any("not logged to W&B" in m.value for m in at.markdown)
    at.radio(key="compare_x").set_value("epoch").run()
    assert not at.exception


def test_the_config_diff_shows_settings_as_text_not_folder_or_wandb_names(runs_root):
    base = R.read_run(runs_root / "base")
    other = R.RunInfo("other", runs_root / "other", config={**base.config, "out": "/elsewhere", "run_name": "x", "wandb_tags": "a,b",
                                                             "lr": 0.001, "ema_decay": None, "augment": True})
    diff = pd.DataFrame(R.config_diff([base, other]))
    assert list(diff["option"]) == ["augment", "ema_decay", "lr"]
    assert list(diff["other"]) == ["True", "", "0.001"] and all(isinstance(v, str) for v in diff["base"])
    pa.Table.from_pandas(diff)  # one type per column: Arrow takes it


def test_compare_charts_runs_that_validated_at_different_steps():
    merged = pd.DataFrame({"step": [10, 15, 20, 25, 20], "run": ["a", "b", "a", "b", "a"],
                           "val/ssim": [0.1, 0.2, 0.3, 0.4, None], "loss/G": [1, 2, 3, 4, 5]})
    merged["loss/identity"] = 0.0  # weighted 0: zero throughout, not drawn
    points = R.chart_series(merged, {"val/ssim": "SSIM", "loss/identity": "identity"}, "step")
    assert not points["value"].isna().any()  # every point lies on its run's line
    assert {series: list(rows["step"]) for series, rows in points.groupby("series")} == {"a · SSIM": [10, 20], "b · SSIM": [15, 25]}


def test_pages_render_no_stray_values(app):
    """Streamlit's magic writes the value of a bare expression: a `None`, or a DeltaGenerator's docstring."""
    for page, run in (("Compare", None), ("Run", "base"), ("Translate", "base")):
        at = go(app, page, run)
        if page == "Compare":
            at.multiselect(key="compare_runs").set_value(["base", "crashed"]).run()  # configurations differ
        assert not at.get("help_info"), page  # st.help of a DeltaGenerator
        assert not [e for e in at.markdown if e.value.strip("` ") == "None"], page


def test_run_page_shows_predictions_as_labelled_tiles_gif_and_checkpoints(app, runs_root):
    at = go(app, "Run", "base")
    assert at.select_slider(key="epoch").value == 1
    at.select_slider(key="epoch").set_value(0).run()
    tiles = rundir.split_grid(np.asarray(Image.open(rundir.prediction_path(runs_root / "base", 0))))
    assert len(tiles) == 2 * 4 and all(len(row) == 4 for row in tiles), "4 val slices, both directions"
    assert len(at.image) == 4 * len(tiles) + 1, "a tile per image, and the GIF"
    texts = [m.value for m in at.markdown]
    assert {"**input**", "**translation**", "**cycle**", "**ground truth**"} <= set(texts)
    assert "val slice 4  \nT2→T1" in texts
    checkpoints = at.dataframe[0].value
    assert list(checkpoints["step"]) == sorted(checkpoints["step"]) and checkpoints["step"].iloc[-1] == 40
    assert (checkpoints["best"] == "★").sum() == 1


@pytest.mark.parametrize("damage", ["not a png", "one column short", "one pixel", "100 val slices"])
def test_a_prediction_file_the_trainer_cannot_have_written_is_named_not_drawn(damage, trained, tmp_path, monkeypatch):
    """Run folders are shared: a damaged epoch PNG stopped the Run page, and any PNG was cut into tiles, however many."""
    root = tmp_path / "runs"
    shutil.copytree(trained, root / "base")
    path = rundir.prediction_path(root / "base", 1)
    tile = [np.full((16, 16), 0.5)] * len(rundir.PREDICTION_COLUMNS)
    if damage == "not a png":
        path.write_bytes(b"not a png")
    elif damage == "one pixel":
        Image.fromarray(np.zeros((1, 1), np.uint8)).save(path)
    else:
        grid = rundir.prediction_grid([tile[:-1] if damage == "one column short" else tile] * (2 if damage == "one column short" else 200))
        Image.fromarray(grid).save(path)
    monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(root))
    st.cache_data.clear()
    at = go(AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run(), "Run", "base")
    warnings = [w.value for w in at.warning]
    if damage == "100 val slices":
        assert not warnings and "The first 16 of 100 val slices." in [c.value for c in at.caption]
        assert len(at.image) == 16 * 2 * len(rundir.PREDICTION_COLUMNS) + 1, "16 val slices drawn, and the GIF"
    else:
        expect = "not a readable PNG" if damage == "not a png" else "not a grid of 4 square tiles per row"
        assert any(w.startswith(f"{path.name}: ") and expect in w for w in warnings), warnings
        assert len(at.image) == 1, "no tiles, only the GIF"


def test_prediction_tiles_come_back_whole_and_upscale_without_blur():
    rows = [[np.full((24, 24), (i * 4 + j) / 8.0) for j in range(4)] for i in range(2)]
    tiles = rundir.split_grid(rundir.prediction_grid(rows))
    assert [[t.shape for t in row] for row in tiles] == [[(24, 24)] * 4] * 2
    assert all(np.array_equal(t, rundir.to_uint8(r)) for row, tr in zip(rows, tiles) for r, t in zip(row, tr))
    checker = (np.indices((24, 24)).sum(0) % 2 * 255).astype(np.uint8)
    big = R.upscaled(checker, 256)
    assert big.shape == (264, 264) and set(np.unique(big)) == {0, 255}  # 11x, whole pixels, no new values
    assert np.array_equal(big[::11, ::11], checker)


def test_loading_a_model_shows_a_spinner(app, monkeypatch):
    """AppTest keeps no spinner element, so the spinner calls are recorded where Streamlit's cache makes them."""
    from streamlit.delta_generator import DeltaGenerator

    shown, spinner = [], DeltaGenerator.spinner

    def recording(self, text="", **kwargs):
        shown.append(text)
        return spinner(self, text, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "spinner", recording)
    st.cache_resource.clear()  # a model an earlier test loaded would come from the cache, with no spinner
    go(app, "Translate", "base")
    assert "loading the model" in shown, shown


def test_run_page_names_a_broken_run(app):
    at = go(app, "Run", "broken")
    assert any("broken" in e.value and "Error" in e.value for e in at.error)


def test_translate_a_val_slice_with_ground_truth_and_metrics(app, shards_dir):
    at = go(app, "Translate", "base")
    assert at.selectbox(key="checkpoint").value.best, "the best checkpoint is preselected"
    heads = [s["mask"].sum() for s in val_samples(str(shards_dir), at.radio(key="split").value)]
    assert heads[at.slider(key="slice").value] == max(heads), "the first slice shown is the one with the most head"
    assert any("masked SSIM" in m.value for m in at.markdown)
    assert len(at.image) == 5  # input, translation, cycle, ground truth, error
    at.radio(key="direction").set_value("t2_to_t1").run()
    at.slider(key="slice").set_value(0).run()
    assert not at.exception and any("masked SSIM" in m.value for m in at.markdown)


def test_translate_shows_a_hallucination_map_overlay(app):
    at = go(app, "Translate", "base")
    for mode in ("tta", "ensemble"):  # the run keeps two checkpoints, so ensemble works
        at.selectbox(key="uncertainty").set_value(mode).run()
        assert not at.exception and not at.warning
        assert len(at.image) == 6  # input, translation, cycle, ground truth, error, hallucination map
        assert any(f"Hallucination map ({mode})" in c.value for c in at.caption)
        overlay = at.image[5].proto.imgs[0]
        assert overlay.caption == "hallucination map"
    at.selectbox(key="uncertainty").set_value("aleatoric").run()  # the run has no scale heads: a warning says why
    assert not at.exception and any("--lambda_aleatoric" in w.value for w in at.warning) and len(at.image) == 5


def scores_line(at) -> str:
    return next(m.value for m in at.markdown if "masked SSIM" in m.value)


def test_translate_can_average_flipped_and_shifted_copies(app, runs_root):
    at = go(app, "Translate", "base")
    assert at.checkbox(key="tta").value is False, "off for a run that did not validate with --val_tta"
    single = scores_line(at)
    at.checkbox(key="tta").check().run()
    at.selectbox(key="uncertainty").set_value("cycle").run()
    assert not at.exception and not at.warning
    assert scores_line(at) != single and len(at.image) == 6

    config = runs_root / "base" / rundir.CONFIG
    original = config.read_text()
    config.write_text(yaml.safe_dump({**yaml.safe_load(original), "val_tta": True}))
    try:
        fresh = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
        assert go(fresh, "Translate", "base").checkbox(key="tta").value is True, "on for a run that validated with --val_tta"
    finally:
        config.write_text(original)


def test_translate_with_an_ensemble_of_runs(app):
    at = go(app, "Translate", "base")
    single = scores_line(at)
    options = at.multiselect(key="ensemble").options
    assert "partner" in options and "base" not in options and "broken" not in options
    at.multiselect(key="ensemble").set_value(["partner"]).run()
    assert not at.exception and not at.error and scores_line(at) != single
    assert any(c.value.startswith("Ensemble of 2: base/step-") and "partner/step-" in c.value for c in at.caption)
    at.selectbox(key="uncertainty").set_value("ensemble").run()  # the members' spread
    assert not at.exception and not at.warning and len(at.image) == 6
    at.multiselect(key="ensemble").set_value(["crashed"]).run()  # its weights are corrupt: named, not a traceback
    assert not at.exception and any("crashed" in e.value and "cannot load the generator" in e.value for e in at.error)


def test_translate_an_uploaded_image(app):
    at = go(app, "Translate", "base")
    at.radio(key="source").set_value("Image (PNG/JPG/TIFF)").run()
    y, x = np.mgrid[:181, :217]
    head = (((x - 108) / 90) ** 2 + ((y - 90) / 80) ** 2 < 1) * 200
    buf = io.BytesIO()
    Image.fromarray(head.astype(np.uint8)).convert("RGB").save(buf, format="PNG")
    at.file_uploader(key="image_upload").upload("slice.png", buf.getvalue(), "image/png")
    at.run()
    assert not at.exception and len(at.image) == 3  # input, translation, cycle: no ground truth


def test_translate_an_uploaded_volume_and_download_it(app, ixi_tars):
    with tarfile.open(ixi_tars / "IXI-T1.tar") as tar:
        member = sorted(tar.getmembers(), key=lambda m: m.name)[0]
        data = tar.extractfile(member).read()
    at = go(app, "Translate", "base")
    at.radio(key="source").set_value("NIfTI volume").run()
    at.file_uploader(key="volume_upload").upload(member.name, data, "application/gzip")
    at.run()
    assert at.slider(key="volume_slice").max > 5
    at.selectbox(key="uncertainty").set_value("tta").run()  # the map of an uploaded slice is masked to its head
    assert not at.exception and len(at.image) == 4 and any("mean inside the head" in c.value for c in at.caption)
    at.button(key="translate_volume").click().run()
    assert not at.exception
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download the translated volume (NIfTI)" in labels


@pytest.fixture(scope="module")
def dicom_series(ixi_tars, tmp_path_factory) -> list[tuple[str, bytes]]:
    """One subject's T1 as a DICOM series written by SimpleITK (GDCM): (file name, bytes) per slice."""
    root = tmp_path_factory.mktemp("dicom-upload")
    with tarfile.open(ixi_tars / "IXI-T1.tar") as tar:
        member = sorted(tar.getmembers(), key=lambda m: m.name)[0]
        (root / member.name).write_bytes(tar.extractfile(member).read())
    write_series(root / member.name, root / "series", "PAT001", "1.2.826.0.9", "1.2.826.0.9.1")
    return [(p.name, p.read_bytes()) for p in sorted((root / "series").iterdir())]


def upload_series(app, files: list[tuple[str, bytes]]) -> AppTest:
    at = go(app, "Translate", "base")
    at.radio(key="source").set_value("DICOM series").run()
    uploader = at.file_uploader(key="dicom_upload")
    for name, data in files:
        uploader.upload(name, data, "application/octet-stream")
    return at.run()


def zipped(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("packed", ["files", "zip"])
def test_translate_an_uploaded_dicom_series_and_download_it(packed, app, dicom_series):
    files = dicom_series if packed == "files" else [("series.zip", zipped([(f"PAT001/T1/{n}", d) for n, d in dicom_series]))]
    at = upload_series(app, files)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.slider(key="volume_slice").max + 1 > len(dicom_series) // 2 and len(at.image) == 3
    at.button(key="translate_volume").click().run()
    download = next(b for b in at.get("download_button") if b.proto.label == "Download the translated volume (NIfTI)")
    assert download.proto.url and not at.exception


@pytest.mark.parametrize("case, expect", [
    ("zip bomb", "larger than 300 MB"),  # 400 MB of zeros in a 0.4 MB archive: never inflated past the limit
    ("not a zip", "series.zip: not a readable zip archive"),
    ("one slice", "a single slice is not a volume"),
    ("no DICOM", "no DICOM files"),
])
def test_the_dashboard_names_a_hostile_dicom_upload(case, expect, app, dicom_series):
    files = {"zip bomb": lambda: [("series.zip", zipped([("a", bytes(200 * 2**20)), ("b", bytes(200 * 2**20))]))],
             "not a zip": lambda: [("series.zip", b"PK\x03\x04 truncated")],
             "one slice": lambda: dicom_series[:1],
             "no DICOM": lambda: [("notes.txt", b"not an image")]}[case]()
    at = upload_series(app, files)
    assert not at.exception and any(expect in e.value for e in at.error), [e.value for e in at.error]
    assert not any("dicom-upload-" in e.value for e in at.error)  # the upload is named, not the temporary folder


def test_translate_rejects_a_file_that_is_not_an_image(app):
    at = go(app, "Translate", "base")
    at.radio(key="source").set_value("Image (PNG/JPG/TIFF)").run()
    at.file_uploader(key="image_upload").upload("scan.png", b"definitely not a png", "image/png")
    at.run()
    assert not at.exception and any("scan.png" in e.value and "not a readable image" in e.value for e in at.error)


@pytest.mark.parametrize("case", ["header-2000-cubed", "damaged-deflate", "zero-affine", "voxels-10-m-apart"])
def test_the_dashboard_upload_names_a_hostile_volume(case, app):
    name, make, expect = HOSTILE[case]
    at = go(app, "Translate", "base")
    at.radio(key="source").set_value("NIfTI volume").run()
    at.file_uploader(key="volume_upload").upload(name, make(), "application/gzip")
    at.run()
    assert not at.exception and any(name in e.value and expect in e.value for e in at.error), [e.value for e in at.error]


def test_translate_with_a_corrupt_checkpoint_says_so(app):
    at = go(app, "Translate", "crashed")
    assert any("cannot load the generator" in e.value for e in at.error)


def test_a_run_is_running_while_its_heartbeat_is_fresh_and_its_trainer_alive(trained, tmp_path):
    run = tmp_path / "live"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pkl"))
    (run / rundir.SUMMARY).unlink()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    best = rundir.list_checkpoints(run)[0][0]
    beat = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "step": 30, "total_steps": 40,
            "best_checkpoint_step": best}
    rundir.write_json(run / rundir.HEARTBEAT, beat)
    info = R.read_run(run)
    assert (info.status, info.steps, info.total_steps, info.best_checkpoint_step) == ("running", 30, 40, best)
    assert [c.step for c in R.list_checkpoints(info) if c.best] == [best], "a live run's best checkpoint has its star"
    for stale in ({"time": time.time() - 3 * rundir.HEARTBEAT_S - 1}, {"pid": gone.pid}):  # silent, or its process is gone
        rundir.write_json(run / rundir.HEARTBEAT, {**beat, **stale})
        assert R.read_run(run).status == "crashed", stale
    rundir.write_json(run / rundir.HEARTBEAT, {**beat, "host": "another-node", "pid": gone.pid})  # a pid elsewhere says nothing
    assert R.read_run(run).status == "running"


@pytest.mark.parametrize("name", ["..", "../etc", "/etc", "a/b", "x..y"])
def test_run_names_cannot_leave_the_runs_folder(runs_root, name):
    with pytest.raises(R.UnsafePath):
        R.safe_child(runs_root, name)
    assert R.safe_child(runs_root, "base") == (runs_root / "base").resolve()


@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists("/usr/bin/chromium"):
        setup = subprocess.run(["bash", "dashboard/setup-browser.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if setup.returncode != 0:
            pytest.skip(f"Chromium could not be installed by dashboard/setup-browser.sh: {(setup.stderr or setup.stdout)[-500:]}")
    return "/usr/bin/chromium"


@pytest.fixture
def served(runs_root, shards_dir):
    with serve(runs_root, shards_dir.parent) as url:
        yield url


def test_started_outside_the_repository_it_refuses_to_serve(chromium, runs_root, shards_dir, tmp_path):
    """Outside the repository root .streamlit/config.toml is not read and Streamlit listens on every interface."""
    from playwright.sync_api import expect, sync_playwright

    with serve(runs_root, shards_dir.parent, tmp_path) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            expect(page.get_by_text("Refusing to serve")).to_be_visible(timeout=60_000)
            assert page.get_by_role("heading", name="Runs").count() == 0 and str(runs_root) not in page.content()
            browser.close()


@pytest.mark.parametrize("allow", [False, True])
def test_listening_beyond_loopback_needs_allow_remote(allow, app, monkeypatch):
    from streamlit import config

    monkeypatch.setattr(sys, "argv", ["app.py", *(["--allow-remote"] if allow else [])])
    previous = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    try:
        at = app.run()
    finally:
        config.set_option("server.address", previous)
    refused = any("Refusing to serve" in e.value for e in at.error)
    assert refused != allow and (len(at.dataframe) == 0) != allow


def test_a_config_yaml_of_nested_aliases_is_a_broken_run_never_expanded(trained, tmp_path, monkeypatch):
    """A 500-byte config.yaml that stands for billions of values: comparing it with another run hung the
    dashboard (json.dumps of each option) and would have filled the memory."""
    root = tmp_path / "runs"
    shutil.copytree(trained, root / "base")
    (root / "laughs").mkdir()
    (root / "laughs" / rundir.CONFIG).write_text(BILLION_LAUGHS)
    runs = {info.name: info for info in R.list_runs(root)}
    assert runs["laughs"].status == "broken" and "a YAML alias (*a0)" in runs["laughs"].error and not runs["laughs"].config
    assert all(row["laughs"] == "" for row in R.config_diff(list(runs.values()))), "its options are never read"
    monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(root))
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    assert not at.exception and "a YAML alias" in " ".join(w.value for w in at.warning), [w.value for w in at.warning]
    go(at, "Compare")


@pytest.mark.parametrize("damaged", [rundir.SUMMARY, rundir.METRICS, rundir.HEARTBEAT, rundir.CHECKPOINT_INFO])
def test_json_nested_deeper_than_the_parser_goes_breaks_only_its_own_run(damaged, trained, tmp_path, monkeypatch):
    """200 KB of '[' is a RecursionError in Python's JSON parser, which no handler caught: one such file in one run
    folder stopped the whole dashboard."""
    root = tmp_path / "runs"
    for name in ("base", "deep"):
        shutil.copytree(trained, root / name)
    deep, checkpoint = root / "deep", rundir.list_checkpoints(root / "deep")[-1][1]
    if damaged in (rundir.METRICS, rundir.HEARTBEAT):
        (deep / rundir.SUMMARY).unlink()  # a run without a summary is read from its metrics' tail and its heartbeat
    with open(checkpoint / damaged if damaged == rundir.CHECKPOINT_INFO else deep / damaged, "a" if damaged == rundir.METRICS else "w") as f:
        f.write("[" * 200_000 + "\n")
    runs = {info.name: info for info in R.list_runs(root)}
    if damaged == rundir.SUMMARY:
        assert runs["deep"].status == "broken" and "JSON nested too deeply" in runs["deep"].error
    elif damaged == rundir.CHECKPOINT_INFO:
        assert "JSON nested too deeply" in R.list_checkpoints(runs["deep"])[-1].error
    else:  # listed from its metrics' tail (here all of it the long line) as a run that stopped
        assert runs["deep"].status == "crashed"
        assert len(rundir.read_metrics(deep)) == len(rundir.read_metrics(root / "base")), "every other row still reads"
    monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(root))
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    go(at, "Run", "deep")
    go(at, "Translate", "deep")


def test_links_out_of_the_runs_folder_are_listed_as_broken_and_never_read(runs_root, shards_dir, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs_root / "base", outside)
    link = runs_root / "linked"
    link.symlink_to(outside, target_is_directory=True)
    try:
        info = next(r for r in R.list_runs(runs_root) if r.name == "linked")
        assert info.status == "broken" and "outside the runs folder" in info.error and not info.config
        with pytest.raises(R.UnsafePath):
            R.safe_child(runs_root, "linked")
        monkeypatch.setenv("MRI_CYCLEGAN_RUNS", str(runs_root))
        monkeypatch.setenv("MRI_CYCLEGAN_DATA", str(shards_dir.parent))
        st.cache_data.clear()  # the run list is cached for a few seconds: an earlier test's list lacks the link
        at = go(AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run(), "Run", "linked")
        assert any("outside the runs folder" in e.value for e in at.error)
        assert R.inside(runs_root, runs_root / "base" / "config.yaml")
        (runs_root / "base" / "escape.png").symlink_to(outside / "progress.gif")
        assert not R.inside(runs_root / "base", runs_root / "base" / "escape.png")
    finally:
        link.unlink()
        (runs_root / "base" / "escape.png").unlink(missing_ok=True)


def test_in_a_real_browser_select_a_run_and_translate(chromium, served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served)
        expect(page.get_by_role("heading", name="Runs")).to_be_visible(timeout=60_000)
        assert page.get_by_test_id("stAppDeployButton").count() == 0 and page.get_by_role("button", name="Deploy").count() == 0
        sidebar = page.get_by_test_id("stSidebar")
        sidebar.get_by_text("Translate", exact=True).click()
        expect(page.get_by_role("heading", name="Translate with base")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("masked SSIM")).to_be_visible(timeout=60_000)
        main = page.get_by_test_id("stMain")
        expect(main.get_by_text("ground truth", exact=True)).to_be_visible(timeout=60_000)
        expect(main.locator("img").nth(4)).to_be_attached(timeout=60_000)  # at least 5 images, waited for: they render one by one
        shot = tmp_path / "translate.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    with Image.open(shot) as im:
        assert im.size[0] == 1400 and np.asarray(im.convert("L")).std() > 10, "a rendered page, not a blank one"


def test_the_screenshot_script_renders_every_page(chromium, runs_root, shards_dir, dicom_series, tmp_path):
    """Every page, and a DICOM series (written by SimpleITK) uploaded through the browser and translated."""
    series = tmp_path / "series"
    series.mkdir()
    for name, data in dicom_series:
        (series / name).write_bytes(data)
    shots = screenshots(runs_root, shards_dir.parent, "base", tmp_path / "shots", dicom=sorted(series.iterdir()))
    assert [p.name for p in shots] == ["dashboard-runs.png", "dashboard-compare.png", "dashboard-run.png", "dashboard-translate.png",
                                       "dashboard-translate-dicom.png"]
    for path in shots:
        with Image.open(path) as im:
            assert im.size[0] == 1400 and np.asarray(im.convert("L")).std() > 10, f"{path.name}: a rendered page, not a blank one"
    assert not list((tmp_path / "shots").glob(".*.tmp.png"))
