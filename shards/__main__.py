"""python -m shards {download,synth,pack,inspect}: see docs/shards.md."""

from __future__ import annotations

import argparse
import sys

from .bias import BIAS_CORRECTION
from .download import IXI_BASE_URL, DownloadError, download_ixi
from .format import ShardsError
from .pack import REGISTER, PackOptions, pack
from .sources import SourceError


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions like 0.8,0.1,0.1, got {text!r}")
    return parts


def _motion(text: str) -> tuple[float, float]:
    try:
        degrees, mm = (float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DEG,MM like 10,10, got {text!r}") from None
    return degrees, mm


def _md5(text: str) -> tuple[str, str]:
    modality, _, digest = text.partition("=")
    if modality not in ("T1", "T2") or len(digest) != 32:
        raise argparse.ArgumentTypeError(f"expected T1=<32 hex digits> or T2=<32 hex digits>, got {text!r}")
    return modality, digest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("download", help="fetch IXI-T1.tar / IXI-T2.tar with resume and MD5 check")
    d.add_argument("--out", required=True, help="folder for the tars (created; a partial download resumes)")
    d.add_argument("--modality", nargs="+", choices=["T1", "T2"], default=["T1", "T2"], help="which tars (default: T1 T2)")
    d.add_argument("--base-url", default=IXI_BASE_URL, help=f"where IXI's tars are served (default: {IXI_BASE_URL})")
    d.add_argument("--md5", type=_md5, action="append", default=[], metavar="MOD=HEX",
                   help="expected checksum, overriding IXI's (for mirrors)")
    d.add_argument("--retries", type=int, default=5, help="attempts per tar after a dropped connection (default: 5)")

    s = commands.add_parser("synth", help="write a synthetic IXI stand-in (IXI-T1.tar, IXI-T2.tar)")
    s.add_argument("--out", required=True, help="folder for IXI-T1.tar, IXI-T2.tar and the files the options add")
    s.add_argument("--subjects", type=int, required=True, help="how many subjects (IXI has about 580)")
    s.add_argument("--seed", type=int, default=0, help="the same seed gives the same subjects, byte for byte (default: 0)")
    s.add_argument("--downsample", type=int, default=1, help="divide IXI's matrix by this (same field of view); for fast tests")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    s.add_argument("--lesions", action="store_true",
                   help="give ~10%% of subjects white-matter lesions; masks in IXI-lesions.tar, subjects in holdout.txt")
    s.add_argument("--holdout-anatomy", action="store_true",
                   help="give ~5%% of subjects enlarged ventricles, listed in holdout.txt (never trained on)")
    s.add_argument("--motion", type=_motion, default=None, metavar="DEG,MM",
                   help="move each head between T1 and T2 by up to DEG degrees and MM mm; true transforms in motion.json")

    p = commands.add_parser("pack", help="T1/T2 sources -> WebDataset shards split by subject")
    p.add_argument("--t1", required=True, help="IXI tar, or a folder of .nii/.nii.gz, DICOM series or 2D images")
    p.add_argument("--t2", required=True, help="as --t1, for the T2-weighted volumes")
    p.add_argument("--out", required=True, help="an empty folder for the shards and manifest.json")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels, a power of two (default: 256, 1 mm at --fov 256)")
    p.add_argument("--fov", type=float, default=256.0, help="in-plane field of view, mm (spacing = fov/size; default: 256)")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                   help="fractions of the subjects for each split, by subject (default: 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split (default: 0)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (closed at a subject boundary; default: 1000)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pack into --out")
    p.add_argument("--strict", action="store_true", help="fail if any file is skipped")
    p.add_argument("--lesions", default=None, help="lesion masks (tar or folder of <subject>-lesion.nii.gz): "
                   "carried into val/test as lesion.png; their subjects never go to train")
    p.add_argument("--register", choices=REGISTER, default="rigid",
                   help="register each paired subject's T2 onto its T1 (6-DOF, mutual information) before val/test "
                        "slices are cut; 2D image sources are never registered (default: rigid)")
    p.add_argument("--bias-correction", choices=BIAS_CORRECTION, default="none",
                   help="n4: divide out each volume's bias field (N4) before normalization; checkpoints record it and "
                        "train.translate applies it too (default: none)")
    p.add_argument("--holdout", default=None, help="text file of subject ids (one per line, # comments) kept out of train")

    i = commands.add_parser("inspect", help="print the manifest summary and write a contact sheet PNG")
    i.add_argument("dir", help="a shards folder written by pack")
    i.add_argument("--png", default=None, help="also write a contact sheet of sample slices to this PNG")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            for path in download_ixi(args.out, args.modality, args.base_url, dict(args.md5), retries=args.retries):
                print(path)
        elif args.command == "synth":
            from .synth import synthesize

            table = synthesize(args.out, args.subjects, args.seed, args.downsample, args.workers, args.lesions, args.holdout_anatomy,
                               args.motion)
            print(f"{args.out}: {sum('T1' in s.contrasts for s in table)} T1, {sum('T2' in s.contrasts for s in table)} T2 volumes"
                  f", {sum(s.lesions > 0 for s in table)} with lesions, {sum(s.variant is not None for s in table)} with held-out anatomy")
        elif args.command == "pack":
            if args.size < 16 or args.size & (args.size - 1):
                parser.error(f"--size must be a power of two >= 16 (the U-Net halves it down to 1), got {args.size}")
            options = PackOptions(args.size, args.fov, args.split, args.seed, args.shard_size, args.register,
                                  args.bias_correction)
            manifest = pack(args.t1, args.t2, args.out, options, args.workers, args.resume, args.strict,
                            lesions_src=args.lesions, holdout_file=args.holdout)
            from .inspect import summary

            print(summary(manifest))
        elif args.command == "inspect":
            from .inspect import inspect

            print(inspect(args.dir, args.png))
    except (ShardsError, SourceError, DownloadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
