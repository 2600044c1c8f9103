"""Browse and compare training runs, and translate slices and volumes with their checkpoints.

    streamlit run dashboard/app.py [-- --runs runs --data data]

The runs folder comes from --runs, else $MRI_CYCLEGAN_RUNS, else ./runs; shards for the Translate page are
read only from --data ($MRI_CYCLEGAN_DATA, ./data). Served on 127.0.0.1 (.streamlit/config.toml); started where that
file is not read, the pages refuse to serve unless `-- --allow-remote` is given.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import math
import os
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import streamlit as st
import torch

from dashboard import runs as R
from shards.dicom import MAX_FILES, read_series
from shards.format import ShardsError, encode_png16, shard_paths
from shards.preprocess import VolumeError, load_image, load_nifti, standardize_image
from train import rundir
from train.data import val_samples
from train.fidelity import MODES, HallucinationMap, translate_with_map
from train.inference import (CheckpointError, Translator, load_translator, prepare_volume, read_checkpoint_info, resolve_checkpoint,
                             restore_volume, translate, translate_slices)
from train.metrics import slice_metrics

MAX_IMAGE_MB, MAX_VOLUME_MB = 20, 300
TILE_PX = 256  # prediction tiles are upscaled to at least this
MAX_SHOWN_SLICES = 16  # of an epoch's prediction grid (the trainer draws --preview_slices, 4 by default)
# Compare's charts: each draws several metrics, a line per run and metric
CHARTS = {
    "Masked SSIM": {rundir.val_name(d, "ssim_masked"): label for d, label in rundir.LABELS.items()},
    "Texture (1 = the truth's high-frequency energy)": {rundir.val_name(d, "texture"): label for d, label in rundir.LABELS.items()},
    "Brightness (1 = the truth's mean inside the head)": {rundir.val_name(d, "brightness"): label for d, label in rundir.LABELS.items()},
    "Masked PSNR (dB)": {rundir.val_name(d, "psnr_masked"): label for d, label in rundir.LABELS.items()},
    "Cycle SSIM": dict(zip(rundir.VAL_CYCLE, ("T1→T2→T1", "T2→T1→T2"))),
    "Generator losses": {f"loss/{n}": n for n in rundir.LOSSES if not n.startswith("D")},
    "Discriminator losses": {f"loss/{n}": n for n in rundir.LOSSES if n.startswith("D")},
    "Gradient norms (largest per logged row)": {k: k.removeprefix("grad_norm/") for k in rundir.GRAD_NORMS},
}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def app_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=os.environ.get("MRI_CYCLEGAN_RUNS", "runs"))
    parser.add_argument("--data", default=os.environ.get("MRI_CYCLEGAN_DATA", "data"))
    parser.add_argument("--allow-remote", action="store_true", help="serve pages when Streamlit listens beyond this machine")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args


def refuse_remote(allow_remote: bool) -> None:
    """Streamlit listens on every interface unless told otherwise, and reads .streamlit/config.toml only from the
    folder it was started in. Started elsewhere, it would serve runs, checkpoints and uploads to the network:
    the page then shows only this refusal, unless `-- --allow-remote` says that is meant."""
    address = st.get_option("server.address")
    if address in LOOPBACK or allow_remote:
        return
    st.error(f"Refusing to serve: Streamlit is listening on {address or 'every network interface'}, not on this machine only. "
             f"Start it with `streamlit run dashboard/app.py --server.address 127.0.0.1` (or from the repository root, whose "
             f".streamlit/config.toml says so), or add `-- --allow-remote` to serve other machines deliberately.")
    st.stop()


@st.cache_data(ttl=5, show_spinner=False)
def cached_runs(root: str) -> list[R.RunInfo]:
    return R.list_runs(Path(root))


@st.cache_data(show_spinner=False)
def cached_metrics(run: str, mtime: float) -> pd.DataFrame:
    return R.metrics_table(Path(run))


@st.cache_resource(show_spinner="loading the model", max_entries=8)
def cached_translator(checkpoints: tuple[str, ...], direction: str, mtime: float, tta: bool) -> Translator:
    """One checkpoint's generator, or several checkpoints' ensemble; mtime: the newest of their checkpoint.json."""
    return load_translator([Path(c) for c in checkpoints], direction, tta=tta)[0]


@st.cache_resource(show_spinner="preparing the hallucination map", max_entries=4)
def cached_map(checkpoints: tuple[str, ...], direction: str, mode: str, mtime: float, tta: bool, _translator: Translator,
               _back: Translator) -> HallucinationMap:
    # the translators are left out of the cache key; the checkpoints, direction and tta stand for them
    return HallucinationMap(mode, _translator, [Path(c) for c in checkpoints], direction, back=_back)


@st.cache_data(show_spinner=False, max_entries=4)
def cached_split(shards: str, split: str) -> list[dict]:
    return val_samples(shards, split)


@st.cache_data(show_spinner=False, max_entries=2)
def cached_volume(digest: str, data: bytes, preprocessing: dict):
    volume, affine, _ = load_nifti(data)
    return volume.shape, affine, prepare_volume(volume, affine, preprocessing)


def unpack_series(uploads, folder: Path) -> None:
    """Write the uploaded files of one DICOM series, or a .zip of its folder, into `folder` under numbered
    names: neither an upload's name nor a member's path becomes a path here. A zip is read no further than
    MAX_VOLUME_MB in all, whatever sizes its headers claim. VolumeError names the upload."""
    budget, count = MAX_VOLUME_MB * 2**20, 0

    def keep(name: str, data: bytes) -> None:
        nonlocal budget, count
        budget -= len(data)
        count += 1
        if budget < 0:
            raise VolumeError(f"{name}: the series is larger than {MAX_VOLUME_MB} MB")
        if count > MAX_FILES:
            raise VolumeError(f"{name}: more than the {MAX_FILES} files a series may have")
        (folder / f"{count:05d}.dcm").write_bytes(data)

    for upload in uploads:
        if not upload.name.lower().endswith(".zip"):
            keep(upload.name, upload.getvalue())
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(upload.getvalue())) as archive:
                for member in archive.infolist():
                    if not member.is_dir():
                        with archive.open(member) as stream:
                            keep(f"{upload.name}: {member.filename}", stream.read(max(budget, 0) + 1))
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as err:  # damaged, encrypted
            raise VolumeError(f"{upload.name}: not a readable zip archive ({err})") from None


@st.cache_data(show_spinner="reading the DICOM series", max_entries=2)
def cached_series(digest: str, _uploads, preprocessing: dict):
    """The uploads' one series, prepared for translation; `digest` stands for the uploads' bytes."""
    label = _uploads[0].name if len(_uploads) == 1 else f"the {len(_uploads)} files uploaded"
    with tempfile.TemporaryDirectory(prefix="dicom-upload-") as folder:
        try:
            unpack_series(_uploads, Path(folder))
            series = read_series(Path(folder))
        except VolumeError as err:  # name the upload, not the temporary folder it was read from
            raise VolumeError(str(err).replace(folder, label)) from None
    return series.data.shape, series.affine, prepare_volume(series.data, series.affine, preprocessing)


def metrics_of(run: R.RunInfo) -> pd.DataFrame:
    path = run.path / "metrics.jsonl"
    return cached_metrics(str(run.path), path.stat().st_mtime if path.exists() else 0.0)


def page_runs(runs: list[R.RunInfo]) -> None:
    st.header("Runs")
    if not runs:
        st.info("No runs yet. Train one: `make demo`, or `accelerate launch train/main.py --data ... --out runs/NAME`.")
        return
    st.dataframe(pd.DataFrame([r.row() for r in runs]), hide_index=True, width="stretch")
    for run in runs:
        if run.error:
            st.warning(f"{run.name}: {run.error}")


def page_compare(runs: list[R.RunInfo]) -> None:
    st.header("Compare runs")
    usable = [r for r in runs if r.status != "broken"]
    chosen = st.multiselect("Runs", [r.name for r in usable], default=[r.name for r in usable[:2]], key="compare_runs")
    picked = [r for r in usable if r.name in chosen]
    if not picked:
        st.info("Select one or more runs.")
        return
    x = st.radio("x axis", ["step", "epoch"], horizontal=True, key="compare_x")
    tables = []
    for run in picked:
        table = metrics_of(run)
        if not table.empty:
            tables.append(table.assign(run=run.name))
    if not tables:
        st.info("These runs have no metrics yet.")
        return
    merged = pd.concat(tables, ignore_index=True)
    st.caption("A line per run and direction or loss; losses weighted 0 (zero throughout) are left out.")
    for (title, columns), place in zip(CHARTS.items(), st.columns(2) * math.ceil(len(CHARTS) / 2)):
        points = R.chart_series(merged, columns, x)
        place.markdown(f"**{title}**")
        if points.empty:
            place.write("not logged")
        else:
            place.line_chart(points, x=x, y="value", color="series", height=260)
    st.subheader("Configuration differences")
    diff = R.config_diff(picked)
    if diff:  # a statement, not a conditional expression: Streamlit's magic would render its value
        st.dataframe(pd.DataFrame(diff), hide_index=True)
    else:
        st.write("Same configuration.")
    st.download_button("Download the comparison (CSV)", merged.to_csv(index=False), "comparison.csv", "text/csv")
    st.subheader("Weights & Biases")
    for run in picked:
        link = R.wandb_link(run.path)
        st.markdown(f"**{run.name}**: " + (f"[{link}]({link})" if link and link.startswith("http") else f"`{link}`" if link else "not logged to W&B"))


def page_run(run: R.RunInfo) -> None:
    st.header(f"Run {run.name}")
    if run.error:
        st.error(f"{run.name}: {run.error}")
        return
    st.write(f"status **{run.status}**, step {run.steps}" + (f" of {run.total_steps}" if run.total_steps else ""))
    predictions = [(e, p) for e, p in rundir.list_predictions(run.path) if R.inside(run.path, p)]  # no links out of the run
    if predictions:
        epochs = [e for e, _ in predictions]
        epoch = st.select_slider("Epoch", epochs, value=epochs[-1], key="epoch") if len(epochs) > 1 else epochs[0]
        show_predictions(dict(predictions)[epoch])
    gif = run.path / rundir.GIF
    if gif.exists() and R.inside(run.path, gif):
        st.subheader("Training progress")
        st.image(gif.read_bytes(), caption="predictions over the epochs")
    st.subheader("Checkpoints")
    checkpoints = R.list_checkpoints(run)
    if not checkpoints:
        st.write("No checkpoints yet.")
    rows = [{"step": c.step, "best": "★" if c.best else "", "time": time.strftime("%Y-%m-%d %H:%M", time.localtime(c.time)) if c.time else "",
             "size (MB)": round(c.size_mb, 1), **R.headline_scores(c.val), "problem": c.error or ""} for c in checkpoints]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True)


def show_predictions(path: Path) -> None:
    """An epoch's prediction grid as labelled tiles: a row per val slice and direction, a column per image."""
    try:
        rows = rundir.read_prediction(path)
    except ValueError as err:
        st.warning(f"{path.name}: {err}")
        return
    slices = len(rows) // len(rundir.PREDICTION_ROWS)
    if slices > MAX_SHOWN_SLICES:
        st.caption(f"The first {MAX_SHOWN_SLICES} of {slices} val slices.")
    widths = [0.5] + [1] * len(rundir.PREDICTION_COLUMNS)
    for column, name in zip(st.columns(widths)[1:], rundir.PREDICTION_COLUMNS):
        column.markdown(f"**{name}**")
    for index, row in enumerate(rows[:MAX_SHOWN_SLICES * len(rundir.PREDICTION_ROWS)]):
        label, *places = st.columns(widths)
        slice_number, direction = divmod(index, len(rundir.PREDICTION_ROWS))
        label.markdown(f"val slice {slice_number + 1}  \n{rundir.LABELS[rundir.PREDICTION_ROWS[direction]]}")
        for place, tile in zip(places, row):
            place.image(R.upscaled(tile, TILE_PX), width="stretch")


def show_row(images: dict[str, np.ndarray]) -> None:
    for column, (caption, image) in zip(st.columns(len(images)), images.items()):
        column.image(np.clip(image, 0, 1), caption=caption, clamp=True, width="stretch")


def overlay(image: np.ndarray, heat: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """Grayscale image with `heat` (x gain, clipped to 1) blended in red: where the map flags, it shows."""
    alpha = np.clip(heat * gain, 0, 1)[..., None]
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    return gray * (1 - alpha) + np.array([1.0, 0.1, 0.1]) * alpha


def shards_of(run: R.RunInfo, data_root: Path) -> Path | None:
    shards = Path(str(run.config.get("data", ""))).resolve()
    return shards if shards.is_relative_to(data_root) and shards.is_dir() else None


def page_translate(run: R.RunInfo, runs: list[R.RunInfo], data_root: Path) -> None:
    st.header(f"Translate with {run.name}")
    checkpoints = [c for c in R.list_checkpoints(run) if not c.error]
    if run.error or not checkpoints:
        st.error(f"{run.name}: {run.error or 'no usable checkpoint'}")
        return
    default = next((i for i, c in enumerate(checkpoints) if c.best), len(checkpoints) - 1)
    checkpoint = st.selectbox("Checkpoint", checkpoints, key="checkpoint",
                              index=linked("step", "checkpoint", [str(c.step) for c in checkpoints], default),
                              format_func=lambda c: f"step {c.step}" + (" (best)" if c.best else ""))
    st.query_params["step"] = str(checkpoint.step)
    direction = st.radio("Direction", ["t1_to_t2", "t2_to_t1"], horizontal=True, key="direction",
                         format_func=lambda d: {"t1_to_t2": "T1 → T2", "t2_to_t1": "T2 → T1"}[d])
    mode = st.selectbox("Hallucination map", ["none", *MODES], key="uncertainty",
                        help="tta: spread under flips and shifts; cycle: |back-translation - input|; ensemble: spread "
                             "across the ensemble's members, or else the run's kept checkpoints; aleatoric: the generator's "
                             "own error estimate, for runs trained with --lambda_aleatoric (docs/fidelity.md)")
    tta = st.checkbox("Average flipped and shifted copies (TTA)", value=bool(run.config.get("val_tta")), key="tta",
                      help="translate 10 flipped and shifted copies of the slice and average them, as --tta in train.evaluate; "
                           "on by default where the run validated that way (--val_tta)")
    partners = st.multiselect("Ensemble with", [r.name for r in runs if r.name != run.name and not r.error], key="ensemble",
                              help="other runs of the same size, each at its best checkpoint: the translation is the mean of "
                                   "every member's (a deep ensemble); the tta map spreads over every member's copies "
                                   "(docs/fidelity.md)")
    try:
        members = [checkpoint.path, *(resolve_checkpoint(r.path) for r in runs if r.name in partners)]
        mtime = max((path / rundir.CHECKPOINT_INFO).stat().st_mtime for path in members)
        key = tuple(map(str, members))
        net = cached_translator(key, direction, mtime, tta)
        back = cached_translator(key, rundir.REVERSE[direction], mtime, tta)
        info = read_checkpoint_info(checkpoint.path)
    except (CheckpointError, OSError, ValueError) as err:
        st.error(f"{checkpoint.path.name}: {err}")
        return
    if partners:
        st.caption(f"Ensemble of {len(members)}: " + ", ".join(f"{path.parent.parent.name}/{path.name}" for path in members))
    hallucination = None
    if mode != "none":
        try:
            hallucination = cached_map(key, direction, mode, mtime, tta, net, back)
        except CheckpointError as err:
            st.warning(f"Hallucination map: {err}")
    preprocessing = info["preprocessing"]
    source = st.radio("Input", ["Val/test shard", "Image (PNG/JPG/TIFF)", "NIfTI volume", "DICOM series"], horizontal=True,
                      key="source")

    image, truth, mask, volume, lesion = None, None, None, None, None
    if source == "Val/test shard":
        shards = shards_of(run, data_root)
        splits = [s for s in ("val", "test") if shards and shard_paths(shards, s, "paired")]
        if not splits:
            st.info(f"No val/test shards for this run inside the data folder {data_root} (the run's data: {run.config.get('data')}).")
            return
        split = st.radio("Split", splits, horizontal=True, key="split")
        try:
            samples = cached_split(str(shards), split)
        except ShardsError as err:
            st.error(str(err))
            return
        widest = int(np.argmax([s["mask"].sum() for s in samples]))  # mid-brain, not the skull base a middle index can hit
        index = st.slider("Slice", 0, len(samples) - 1, widest, key="slice")
        sample = samples[index]
        st.caption(f"{sample['key']} ({sample['meta'].get('subject')}, {sample['meta'].get('site')})")
        source_contrast, target_contrast = rundir.DIRECTIONS[direction]
        image, truth, mask, lesion = sample[source_contrast], sample[target_contrast], sample["mask"], sample.get("lesion")
    elif source == "Image (PNG/JPG/TIFF)":
        upload = st.file_uploader("Image", type=["png", "jpg", "jpeg", "tif", "tiff"], key="image_upload")
        if upload is None:
            return
        if upload.size > MAX_IMAGE_MB * 2**20:
            st.error(f"{upload.name}: larger than {MAX_IMAGE_MB} MB")
            return
        try:
            image, mask, _ = standardize_image(load_image(upload.getvalue()), preprocessing["size"])
        except VolumeError as err:
            st.error(f"{upload.name}: {err}")
            return
    else:
        if source == "NIfTI volume":
            upload = st.file_uploader("Volume", type=["nii", "gz"], key="volume_upload")
            if upload is None:
                return
            if upload.size > MAX_VOLUME_MB * 2**20:
                st.error(f"{upload.name}: larger than {MAX_VOLUME_MB} MB")
                return
            data = upload.getvalue()
            try:
                shape, affine, prepared = cached_volume(hashlib.sha1(data).hexdigest(), data, preprocessing)
            except VolumeError as err:
                st.error(f"{upload.name}: {err}")
                return
            name = upload.name
        else:
            uploads = st.file_uploader("DICOM series", accept_multiple_files=True, key="dicom_upload",
                                       help="every file of one series (any names), or one .zip of its folder; translated "
                                            "volumes download as NIfTI (`python -m train.translate --output-format dicom` "
                                            "writes a DICOM series)")
            if not uploads:
                return
            uploads = sorted(uploads, key=lambda u: u.name)
            digest = hashlib.sha1(b"".join(hashlib.sha1(u.getvalue()).digest() for u in uploads)).hexdigest()
            try:
                shape, affine, prepared = cached_series(digest, uploads, preprocessing)
            except VolumeError as err:
                st.error(str(err))
                return
            name = uploads[0].name if len(uploads) == 1 else "dicom-series"
        index = st.slider("Axial slice", 0, len(prepared.images) - 1, len(prepared.images) // 2, key="volume_slice")
        image, mask, volume = prepared.images[index], prepared.image_masks[index], (name, shape, affine, prepared)

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    translated, heat = translate_with_map(net, tensor, hallucination)
    cycled = translate(back, translated)
    row = {"input": image, "translation": translated[0, 0].numpy(), "cycle": cycled[0, 0].numpy()}
    if truth is not None:
        error = np.abs(row["translation"] - truth) * mask
        row.update({"ground truth": truth, "|error| ×4": np.clip(error * 4, 0, 1)})
        scores = slice_metrics(translated, torch.from_numpy(truth)[None, None], torch.from_numpy(mask)[None, None])
        st.write(f"masked SSIM **{scores['ssim_masked'].item():.3f}**, masked PSNR **{scores['psnr_masked'].item():.2f} dB**, "
                 f"whole-image SSIM {scores['ssim'].item():.3f}, texture {scores['texture'].item():.2f} × the truth's")
    if heat is not None:
        heat = heat[0, 0].numpy() * mask  # every input has a head mask: outside it there is nothing to be unsure of
        row["hallucination map"] = overlay(row["translation"], heat)
        st.caption(f"Hallucination map ({mode}): red where the model is unsure; mean inside the head "
                   f"{heat[mask].mean():.4f}, max {heat.max():.3f} (intensity units, shown x8).")
    if lesion is not None and lesion.any():
        row["lesion mask"] = overlay(truth, lesion.astype(np.float32), gain=0.6)
    show_row(row)
    st.download_button("Download this translation (16-bit PNG)", encode_png16(row["translation"]), f"{direction}.png", "image/png")
    if volume is not None and st.button("Translate the whole volume", key="translate_volume"):
        name, shape, affine, prepared = volume
        with st.spinner(f"translating {len(prepared.images)} slices"):
            result = restore_volume(prepared, translate_slices(net, prepared.images), shape, affine)
        buf = io.BytesIO(nib.Nifti1Image(result.astype(np.float32), affine).to_bytes())
        stem = name[:-7] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
        st.download_button("Download the translated volume (NIfTI)", gzip.compress(buf.getvalue()),
                           f"{stem}_{direction.replace('_', '-')}.nii.gz", "application/gzip", key="volume_download")


def linked(query: str, widget: str, options: list[str], default: int) -> int:
    """The option a shared link names (?page=Translate&run=NAME&step=N), on the session's first run; else `default`."""
    wanted = st.session_state.setdefault("link", st.query_params.to_dict()).get(query)
    return options.index(wanted) if widget not in st.session_state and wanted in options else default


def main() -> None:
    try:
        show()
    finally:
        st.session_state["link"] = {}  # a link chooses the first view only; later ones are the user's


def show() -> None:
    st.set_page_config(page_title="mri-cyclegan", layout="wide")
    args = app_args()
    refuse_remote(args.allow_remote)
    runs_root, data_root = Path(args.runs).resolve(), Path(args.data).resolve()
    st.sidebar.title("mri-cyclegan")
    st.sidebar.caption(f"runs: {runs_root}")
    pages = ["Runs", "Compare", "Run", "Translate"]
    page = st.sidebar.radio("Page", pages, index=linked("page", "page", pages, 0), key="page")
    st.query_params.from_dict({"page": page})  # the address bar links to this view (run and step added below)
    runs = cached_runs(str(runs_root))
    if page == "Runs":
        page_runs(runs)
        return
    if page == "Compare":
        page_compare(runs)
        return
    if not runs:
        st.info(f"No runs in {runs_root}.")
        return
    names = [r.name for r in runs]
    name = st.sidebar.selectbox("Run", names, index=linked("run", "run", names, 0), key="run")
    st.query_params["run"] = name
    try:
        run = R.read_run(R.safe_child(runs_root, name))
    except R.UnsafePath as err:
        st.error(str(err))
        return
    if page == "Run":
        page_run(run)
    else:
        page_translate(run, runs, data_root)


main()
