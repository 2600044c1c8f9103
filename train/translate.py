"""Translate T1 <-> T2 with a trained checkpoint: NIfTI volumes or a DICOM series in, NIfTI volumes or a
DICOM series out (2D images too).

    python -m train.translate --checkpoint RUN/checkpoints/step-NNNNNNN [MORE ...] --direction t1-to-t2 \\
        --input FILE_OR_DIR --output DIR [--output-format nifti|dicom] [--tta] [--uncertainty tta|cycle|ensemble|aleatoric]
        [--overwrite] [--batch-size 8]

Each volume is reoriented to RAS, resampled onto the training grid, normalized as the shards were,
translated slice by slice in the axial plane and resampled back: the output has the input's shape and
affine. Output intensities are the target contrast in [0,1] (the shards' normalization: 0 and 1 are the
0.5th and 99.5th percentiles of the head), float32, 0 outside the head. Images (PNG/JPG/TIFF) give
16-bit PNGs of the input's size. --tta translates 10 flipped and shifted copies of each slice and averages
them; several checkpoints translate as the mean of their translations (an ensemble). With --uncertainty,
each translation gets a hallucination map beside it (`<name>_<direction>_uncertainty-<mode>`, same grid, in
the same intensity units; train/fidelity.py). A folder holding DICOM files is one series (any nesting;
several series are refused); with --output-format dicom its translation is a new series in the same study,
marked synthetic (shards/dicom.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from shards.dicom import Volume, dicom_files, is_dicom, read_series, write_series
from shards.format import encode_png16
from shards.preprocess import VolumeError, load_image, load_nifti, read_file
from train.fidelity import MODES, HallucinationMap, translate_with_map
from train.inference import (ENSEMBLE_HELP, TTA_HELP, CheckpointError, device_for_inference, image_outputs, load_translator,
                             volume_outputs)

VOLUME_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def list_inputs(path: Path) -> list[Path]:
    """The files to translate; a folder of DICOM files stands for its one series."""
    if path.is_dir():
        if dicom_files(path):
            return [path]
        found = sorted(p for p in path.iterdir() if p.is_file() and suffix(p) in VOLUME_SUFFIXES + IMAGE_SUFFIXES)
        if not found:
            raise SystemExit(f"error: --input {path}: no .nii, .nii.gz, DICOM, PNG, JPG or TIFF files in this folder")
        return found
    if not path.exists():
        raise SystemExit(f"error: --input {path}: no such file or folder")
    if is_dicom(path):
        raise SystemExit(f"error: --input {path}: one DICOM file is one slice; give the folder that holds its series")
    if suffix(path) not in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        raise SystemExit(f"error: --input {path}: not a NIfTI volume (.nii/.nii.gz), a DICOM series folder or an image (PNG/JPG/TIFF)")
    return [path]


def output_path(path: Path, out_dir: Path, direction: str, uncertainty: str | None = None, output_format: str = "nifti") -> Path:
    ext = "" if path.is_dir() else suffix(path)
    stem = path.name[: len(path.name) - len(ext)]
    tag = f"_uncertainty-{uncertainty}" if uncertainty else ""
    kind = ".png" if ext in IMAGE_SUFFIXES else "" if output_format == "dicom" else ".nii.gz"
    return out_dir / f"{stem}_{direction}{tag}{kind}"


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, codes: tuple[int, int] = (1, 1)) -> None:
    """Float32 NIfTI with the input's affine and (qform, sform) codes, written under a temporary name."""
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_qform(affine, codes[0] or 1)
    image.set_sform(affine, codes[1] or 1)
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp.nii.gz")
    try:
        nib.save(image, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves nothing half-written


def synthetic_labels(name: str, direction: str, info: dict, source: Volume) -> tuple[str, str]:
    """SeriesDescription and DerivationDescription of a derived series: what it is, from what, by which model."""
    source_contrast, target = (c.upper() + "w" for c in direction.split("-to-"))
    what = f"{target} translation" if name == "translation" else f"uncertainty map of a {target} translation"
    checkpoints = ", ".join(info.get("members", [info["path"]]))
    series = source.headers[0].get("SeriesInstanceUID", "")
    description = f"SYNTHETIC {target} from {source_contrast}" + (" (uncertainty)" if name != "translation" else "") + " mri-cyclegan"
    return description, (f"Synthetic image, not acquired: the {what} computed from {source_contrast} series {series} by "
                         f"mri-cyclegan (checkpoint {checkpoints}). Not for diagnosis.")


def write_png(path: Path, image: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(encode_png16(image))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="RUN/checkpoints/step-NNNNNNN, or a run folder for its best checkpoint; " + ENSEMBLE_HELP)
    parser.add_argument("--direction", required=True, choices=["t1-to-t2", "t2-to-t1"], type=lambda text: text.replace("_", "-"),
                        help="t1-to-t2 or t2-to-t1 (t1_to_t2 and t2_to_t1 too)")
    parser.add_argument("--input", type=Path, required=True, help="a .nii/.nii.gz volume, an image, or a folder of them")
    parser.add_argument("--output", type=Path, required=True, help="folder for the translations")
    parser.add_argument("--output-format", choices=["nifti", "dicom"], default="nifti",
                        help="for a DICOM input: a .nii.gz (default), or a new DICOM series marked synthetic")
    parser.add_argument("--overwrite", action="store_true", help="replace translations that already exist")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--tta", action="store_true", help=TTA_HELP)
    parser.add_argument("--uncertainty", choices=MODES, default=None,
                        help="also write a hallucination map per translation (docs/fidelity.md)")
    args = parser.parse_args(argv)

    device = device_for_inference()
    try:
        translator, info = load_translator(args.checkpoint, args.direction, device, args.tta)
        hallucination = HallucinationMap(args.uncertainty, translator, args.checkpoint, args.direction, device) if args.uncertainty else None
    except CheckpointError as err:
        raise SystemExit(f"error: --checkpoint {err}")

    def outputs_of(images):
        translated, spread = translate_with_map(translator, images, hallucination)  # one pass for both where they share copies
        return {"translation": translated, **({"uncertainty": spread} if spread is not None else {})}

    inputs = list_inputs(args.input)
    if args.output_format == "dicom" and not all(p.is_dir() for p in inputs):
        raise SystemExit(f"error: --output-format dicom needs a DICOM series as --input (the derived series joins its "
                         f"patient and study); {inputs[0]} is not one")
    names = ["translation"] + (["uncertainty"] if args.uncertainty else [])
    targets = {p: {name: output_path(p, args.output, args.direction, args.uncertainty if name == "uncertainty" else None,
                                     args.output_format) for name in names} for p in inputs}
    existing = [str(t) for paths in targets.values() for t in paths.values() if t.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {existing[0]} already exists ({len(existing)} in all); pass --overwrite to replace")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a path under a regular file
        raise SystemExit(f"error: --output {args.output}: cannot create this folder ({err.strerror})")
    preprocessing = info["preprocessing"]

    failed = 0
    for path in tqdm(inputs, desc="translate", unit="file", disable=len(inputs) == 1):
        start = time.time()
        try:
            if path.is_dir():
                series = read_series(path)
                outputs = volume_outputs(outputs_of, series.data, series.affine, preprocessing, device, args.batch_size, progress=True)
                for name, volume in outputs.items():
                    if args.output_format == "dicom":
                        write_series(targets[path][name], volume, series, *synthetic_labels(name, args.direction, info, series))
                    else:
                        write_volume(targets[path][name], volume, series.affine)
            elif suffix(path) in VOLUME_SUFFIXES:
                data, affine, _ = load_nifti(read_file(path))
                outputs = volume_outputs(outputs_of, data, affine, preprocessing, device, args.batch_size, progress=True)
                header = nib.load(path).header
                for name, volume in outputs.items():
                    write_volume(targets[path][name], volume, affine, (int(header["qform_code"]), int(header["sform_code"])))
            else:
                outputs = image_outputs(outputs_of, load_image(read_file(path)), preprocessing["size"], device)
                for name, image in outputs.items():
                    write_png(targets[path][name], image)
        except (VolumeError, OSError) as err:  # one bad file is reported; the others are still translated
            tqdm.write(f"error: {path}: {err}", file=sys.stderr)  # on a line of its own, not after the progress bar
            failed += 1
            continue
        print(f"{path} -> {', '.join(str(t) for t in targets[path].values())} ({time.time() - start:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
