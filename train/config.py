"""Training options: one dataclass holds every option, its default and its help text.

Precedence: defaults < `--config FILE.yaml` < command-line flags. The resolved config is saved as the run
folder's config.yaml. `python train/main.py --help` lists everything; docs/training.md explains it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path

import yaml


# a batch larger than this per process is a typo, not a plan: 512 slices of 256² fill an H200's memory many times
MAX_BATCH_SIZE = 512

# Augmentation helped at 245 (128²) and 330 (64²) passes over the training slices (without it the default recipe
# over-trained and its single pass speckled), and at 65 (128², 5 subjects) it kept the run from collapsing; it cost
# at 3, 7 and 54, where it had not caught up by the run's end. docs/fidelity.md, "Small data"
OVER_TRAINING_PASSES = 60
# The contrast was learnt within about 1500 steps (batch 2, lr 5e-4) on every small set measured; augmentation
# begun before it holds it back, and a long run at 64² did better with augmentation from step 3000 than from half-way.
# docs/fidelity.md, "Augmentation in the second half"
AUGMENT_START_LATEST = 3000


def option(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """The defaults are the recipe docs/fidelity.md measured best (MIND 10, LSGAN, cycle 5, no identity loss, U-Net
    depth 3 with sub-pixel convolutions, lr 5e-4, augmentation only for a run past 60 passes over its slices, from
    half-way or step 3000 if sooner, geometric only) at the width and batch it was measured at (ngf/ndf 32, batch 2: at the
    reference's 64 and batch 1 the recipe collapsed);
    `--config train/recipes/seed.yaml` is the seed's plain CycleGAN."""

    # data and run folder
    data: str = option(None, "shards folder written by `python -m shards pack` (local path; shard URLs via --data_url)", required=True)
    out: str = option(None, "run folder (created; see docs/run-folder.md)", required=True)
    data_url: str = option("", "read train shards from DATA_URL + 'train/NAME.tar' instead of --data, e.g. http://host/shards/ or "
                           "'pipe:cat /mnt/shards/' (pipe: runs a shell command: take it only from configs you trust)")
    size: int = option(0, "image size; 0 = the shards' size (must match them)", minimum=0)
    allow_partial: bool = option(False, "go on, with a warning, when a val shard holds fewer samples than the shards' manifest "
                                 "records (default: an error naming the shard)")
    # networks
    generator: str = option("unet", "generator architecture", choices=["unet", "resnet9"])
    ngf: int = option(32, "generator base width (the reference's and the seed's is 64)", minimum=1)
    unet_depth: int = option(3, "U-Net stride-2 levels (the reference's num_downs); 0 = down to 1x1, log2(size), as in the seed. "
                             "Fewer levels bound what each output pixel sees to about 4 x 2**depth pixels (30 at 3, 62 at 4)", minimum=0)
    upsample: str = option("subpixel", "U-Net decoder upsampling (the ResNet generator keeps its transposed convolutions): "
                           "resize (nearest x2, then a 3x3 convolution: no checkerboard speckle), "
                           "subpixel (a 3x3 convolution to 4x the channels, then a pixel shuffle; ICNR-initialised, so it "
                           "starts checkerboard-free and may learn a kernel per output phase) or transpose (the seed's and reference's 4x4 "
                           "stride-2 transposed convolution)", choices=["transpose", "resize", "subpixel"])
    downsample: str = option("strided", "U-Net encoder downsampling below the slice's own level (the ResNet generator keeps its "
                             "strided convolutions): strided (the reference's 4x4 stride-2 convolution) or blur (a fixed "
                             "[1,2,1] low-pass before it, against aliasing: Zhang, ICML 2019)", choices=["strided", "blur"])
    unet_full_res: int = option(16, "channels of a full-resolution stage at the U-Net's output: its last features, bilinearly "
                                "upsampled and concatenated with the input slice, through two 3x3 convolutions at the slice's "
                                "resolution (Ronneberger et al.'s top level); 0 = the reference's, the output straight from the "
                                "last upsampling", minimum=0)
    dropout: float = option(0.0, "generator dropout rate after each U-Net decoder level below the slice's own (training only; "
                            "the reference puts 0.5 at its 512-wide levels)", minimum=0, below=1)
    ndf: int = option(32, "discriminator base width (the reference's and the seed's is 64)", minimum=1)
    disc_layers: int = option(3, "PatchGAN depth: 3 judges 70x70 patches (the reference, for 256x256), 2 judges 34x34, 1 judges 16x16", minimum=1)
    # losses and optimizer
    gan_loss: str = option("lsgan", "adversarial loss: lsgan (least squares) or bce (BCE with logits, as in the seed)", choices=["bce", "lsgan"])
    lambda_adv: float = option(1.0, "weight of the generators' adversarial loss; below 1 the cycle and structure terms weigh more "
                               "against fooling the discriminators", minimum=0)
    lambda_cycle: float = option(5.0, "cycle-consistency L1 weight (lambda; the seed's is 10)", minimum=0)
    lambda_identity: float = option(0.0, "identity L1 weight as a fraction of lambda_cycle (the seed's is 0.5)", minimum=0)
    lambda_structure: float = option(10.0, "MIND structure-consistency L1 between each input and its translation (0 = off, the seed's "
                                     "plain CycleGAN)", minimum=0)
    mind_noise_floor: float = option(0.0, "keep MIND's local variance at least this multiple of the image's noise level (its "
                                     "flattest tenth of the head), so noise-level differences in flat tissue describe no structure "
                                     "while edges well above the noise still do; at 0 (Heinrich's MIND) the structure loss rewards a "
                                     "translation that copies its input's noise", minimum=0)
    lambda_nce: float = option(0.0, "PatchNCE weight (CUT's patch contrastive loss, both ways): each patch of a translation should match the "
                               "input's patch at the same place in the generators' encoder features (0 = off)", minimum=0)
    lambda_aleatoric: float = option(0.0, "a learned hallucination map: each U-Net generator gets a second output, the per-pixel scale of "
                                     "a Laplace distribution around its translation, fitted to the cycle reconstruction's error by "
                                     "this weight times its negative log-likelihood (the translation keeps its L1 losses; UGAC, "
                                     "Upadhyay et al. 2021). Read by --uncertainty aleatoric. 0 = off, no head", minimum=0)
    lambda_equivariance: float = option(10.0, "transformation consistency: L1 between the translation of a randomly flipped and shifted "
                                        "input and the translation moved alike, both ways (0 = off, as in the seed). It penalizes the "
                                        "speckle that --tta averages away, so one pass gives what ten would; a step costs about 30 percent more",
                                        minimum=0)
    equivariance_warmup: int = option(500, "steps over which --lambda_equivariance rises linearly from 0 to its value (0 = at its "
                                      "value from the first step). Early on the term pulls the translations flat, and the "
                                      "discriminators can win before the generators have learnt the contrast", minimum=0)
    cycle_noise: float = option(0.0, "std of Gaussian noise added to each translation (in the model's [-1, 1] range) before the other "
                                "generator takes it back, in training only. The cycle loss asks for the input's own noise back, which "
                                "a generator can hide in its translation as a faint speckle; noise above that level leaves nothing "
                                "to hide it in (Bashkirova et al. 2019). 0 = off, as in the seed", minimum=0)
    pool_size: int = option(50, "history pool of generated images shown to the discriminators", minimum=0)
    lr: float = option(5e-4, "Adam learning rate for the generators, and for the discriminators unless --lr_d (the seed's is 2e-4)", above=0)
    lr_d: float = option(0.0, "Adam learning rate for the discriminators; 0 = --lr. Below --lr the discriminators learn more slowly "
                         "than the generators (a two time-scale update rule)", minimum=0)
    beta1: float = option(0.5, "Adam beta1", minimum=0, below=1)
    beta2: float = option(0.999, "Adam beta2", minimum=0, below=1)
    max_grad_norm: float = option(0.0, "before each optimizer step, clip the gradients of both generators together, and of both "
                                  "discriminators together, to this total L2 norm (0 = off). One outsized gradient otherwise "
                                  "enters Adam's second moment, which forgets it only over thousands of steps. metrics.jsonl's "
                                  "grad_norm/G and grad_norm/D log each window's largest norm before clipping", minimum=0)
    ema_decay: float = option(0.0, "keep an exponential moving average of the generator weights with this decay (e.g. 0.995, "
                              "about the last 1/(1-decay) steps); validation, checkpoints' generators and inference use it. 0 = off",
                              minimum=0, below=1)
    lr_decay_start: float = option(0.5, "fraction of the steps after which the learning rates decay linearly to 0 at the last "
                                   "step (0.5 = the reference's second half; 0 = from the first step; 1 = constant)",
                                   minimum=0, maximum=1)
    # schedule
    batch_size: int = option(2, "images per process per step, for each contrast (the reference's and the seed's is 1)", minimum=1,
                             maximum=MAX_BATCH_SIZE)
    epochs: int = option(10, "number of epochs; the learning rate decays linearly to 0 from --lr_decay_start", minimum=1)
    steps_per_epoch: int = option(0, "steps per epoch; 0 = min(train T1, train T2 slices) / (batch_size x processes)", minimum=0)
    max_steps: int = option(0, "stop after this many steps in total (0 = epochs x steps_per_epoch)", minimum=0)
    seed: int = option(0, "seed for initialization, data order and augmentation")
    deterministic: bool = option(False, "deterministic algorithms only (torch.use_deterministic_algorithms, through Accelerate's "
                                 "set_seed): on a GPU a resumed run then continues bit for bit as the uninterrupted run, at some "
                                 "cost in speed; on CPU training is deterministic without it")
    train_subjects: int = option(0, "train on this many of the shards' training subjects, drawn by --seed (0 = all): small-data "
                                 "runs scored on the same val/test; an epoch keeps the whole split's length", minimum=0)
    # data pipeline
    num_workers: int = option(2, "DataLoader workers per process", minimum=0)
    shuffle_buffer: int = option(500, "samples in the shuffle buffer of each stream", minimum=1)
    augment: bool = option("auto", "random flips and small affines (with --augment_intensity, gamma/gain jitter too; both on in "
                           "the seed). auto = on when the run "
                           f"passes over its training slices more than {OVER_TRAINING_PASSES} times (a small training set trained long, where "
                           "without it the model memorises and its single pass speckles), else off. config.yaml records the one used",
                           auto=True)
    augment_start: float = option("auto", "with augmentation, the steps trained on unaugmented slices before it starts; below 1, "
                                  "a fraction of the run's steps (as Hugging Face's eval_steps). 0 = from the first step, as in the "
                                  "seed. Augmentation begun before the contrast is learnt keeps it from being learnt. auto = half the "
                                  f"run, or step {AUGMENT_START_LATEST} if that is sooner", minimum=0, auto=True)
    augment_intensity: bool = option(False, "with augmentation, also jitter each slice's gamma (0.82-1.22) and gain (0.9-1.1), as "
                                     "the seed did. The discriminators then take a real slice at any of those intensities, so "
                                     "nothing pins the translations' own brightness, which then strays from slice to slice. Off: "
                                     "flips and affines only, at the intensities the shards normalized")
    elastic: float = option(0.0, "with augmentation, also warp each slice smoothly: random offsets of up to this fraction of the slice's "
                            "width at 7x7 control points, interpolated bicubically (between them up to 1.9x that, 1.2x typically). 0.03 is "
                            "about TorchIO's 7.5 mm over a 240 mm field of view; up to 0.04 no warp measured folds the slice. "
                            "Heads differ by such warps, which a flip and an affine do not make. 0 = off", minimum=0, maximum=0.04)
    # precision and devices
    mixed_precision: str = option("", "mixed precision: no, fp16 or bf16; unset = what `accelerate launch` was given (its "
                                  "--mixed_precision or config file), else no. config.yaml records the one used",
                                  choices=["", "no", "fp16", "bf16"])
    channels_last: bool = option(False, "channels_last memory format (helps convolutions on recent GPUs)")
    # validation, checkpoints, logging
    val_every: int = option(0, "validate every N steps (0 = at the end of every epoch)", minimum=0)
    val_max_slices: int = option(256, "validation slices used per validation (all ranks together)", minimum=1)
    val_tta: bool = option(False, "validate, draw the predictions and pick the best checkpoint on the mean of 10 flipped and shifted "
                           "copies of each slice (test-time augmentation, as --tta in train.evaluate and train.translate)")
    preview_slices: int = option(4, "fixed val slices drawn in predictions/epoch-NNN.png", minimum=0)
    checkpoint_every: int = option(500, "checkpoint every N steps (and always at the end)", minimum=1)
    checkpoints_total_limit: int = option(3, "keep the newest K checkpoints, plus the best by val SSIM", minimum=1)
    resume: str = option("", "'auto' or 'latest' (the newest checkpoint in --out, if any) or a checkpoint folder")
    log_every: int = option(10, "log losses and images/s every N steps", minimum=1)
    max_bad_steps: int = option(5, "stop after this many consecutive steps with NaN/inf losses", minimum=1)
    report_to: str = option("wandb", "experiment tracker", choices=["wandb", "none"])
    wandb: str = option("", "W&B mode: online, offline or disabled (default: $WANDB_MODE if set, else online with an API key, else offline)",
                        choices=["", "online", "offline", "disabled"])
    wandb_project: str = option("mri-cyclegan", "W&B project")
    wandb_group: str = option("", "W&B group (e.g. an ablation's name)")
    wandb_tags: str = option("", "comma-separated W&B tags")
    wandb_log_checkpoints: bool = option(False, "at the end, upload the best checkpoint's generators and checkpoint.json to W&B as a "
                                         "model artifact (aliases best and step-N)")
    run_name: str = option("", "run name (default: the run folder's name)")
    trace_keys: bool = option(False, "write the train sample keys each rank reads to RUN/trace/keys-rank-N.txt (to check data splitting)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}


# options that change the networks or what a checkpoint holds: a checkpoint made with others cannot continue this run
# (lambda_nce: PatchNCE's projection heads are trained and checkpointed beside the generators; lambda_aleatoric:
# the generators' scale heads)
ARCHITECTURE_KEYS = ("size", "generator", "ngf", "unet_depth", "upsample", "downsample", "unet_full_res", "ndf", "disc_layers", "ema_decay",
                     "lambda_nce", "lambda_aleatoric")


# option(..., minimum=, maximum=, above=, below=): each bound, the test a value fails it by, and the error's wording
BOUNDS = {"minimum": (operator.lt, "at least"), "maximum": (operator.gt, "at most"), "above": (operator.le, "above"),
          "below": (operator.ge, "below")}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _or_auto(parse, expected: str):
    """A flag parser for an option whose default, "auto", the trainer works out from the run (metadata auto=True)."""
    def parse_or_auto(text: str):
        if text.lower() == "auto":
            return "auto"
        try:
            return parse(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return parse_or_auto


def _from_yaml(value, type_name: str, auto: bool = False):
    """A YAML value as an option's type (annotations are strings here), or "auto" where the option takes it. Numbers
    written as text pass, since PyYAML reads `2e-4` as a string; bools never pass as numbers. Raises ValueError."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if auto and value == "auto":
        return value
    try:
        if isinstance(value, {"bool": bool, "str": str}.get(type_name, ())):
            return value
        if type_name == "float" and (is_number or isinstance(value, str)):
            return float(value)
        if type_name == "int" and (isinstance(value, str) or is_number and isinstance(value, int)):
            return int(value)
    except ValueError:
        pass
    raise ValueError(f"expected {type_name}{' or auto' if auto else ''}, got {value!r}")


# the names Hugging Face's diffusers/accelerate training scripts use, accepted beside this project's own
ALIASES = {"out": "output_dir", "resume": "resume_from_checkpoint", "checkpoint_every": "checkpointing_steps", "lr": "learning_rate",
           "max_steps": "max_train_steps", "num_workers": "dataloader_num_workers"}


def _spellings(name: str) -> list[str]:
    """--name, and --name-with-hyphens where it has underscores (the other tools' spelling)."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def build_parser() -> argparse.ArgumentParser:
    # defaults are None so a flag given on the command line is told apart from the YAML file's value;
    # the help shows each option's real default instead
    parser = argparse.ArgumentParser(description="Train a T1<->T2 CycleGAN (run with `accelerate launch train/main.py`).",
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of options; flags given here override it")
    for f in dataclasses.fields(Config):
        auto = f.metadata.get("auto")
        kind = {"bool": _or_auto(_parse_bool, "true/false/auto") if auto else _parse_bool, "int": int,
                "float": _or_auto(float, "a number or auto") if auto else float}.get(f.type, str)
        names = _spellings(f.name) + (_spellings(ALIASES[f.name]) if f.name in ALIASES else [])
        default = "required" if f.metadata.get("required") else f"default: {f.default!r}"
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(c for c in choices if c) + "}" if choices and "" in choices else None  # "" = unset, not a choice to type
        if f.type == "bool":  # --augment, --augment false, --no-augment
            parser.add_argument(*names, dest=f.name, type=kind, nargs="?", const=True, default=None,
                                metavar="true|false|auto" if auto else "true|false",
                                help=f"{f.metadata['help']} ({default}; --{f.name.replace('_', '-')} or --no-{f.name.replace('_', '-')})")
            negations = dict.fromkeys([f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"])
            parser.add_argument(*negations, dest=f.name, action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=f.name, type=kind, default=None, help=f"{f.metadata['help']} ({default})",
                                choices=choices, metavar=metavar)
    return parser


def load_config(argv=None) -> Config:
    """Defaults < YAML file < flags. Unknown options in either place are errors that name them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    known = {f.name for f in dataclasses.fields(Config)}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        try:
            loaded = read_yaml(path) or {}
        except UnicodeDecodeError:
            parser.error(f"--config {path}: not a text file (expected YAML)")
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            parser.error(f"--config {path}: {where}not valid YAML ({getattr(err, 'problem', None) or err})")
        except ValueError as err:
            parser.error(f"--config {path}: {err}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {path}: expected a mapping of option: value")
        unknown = sorted(set(loaded) - known)
        if unknown:
            parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        for f in dataclasses.fields(Config):
            if f.name in loaded:
                try:
                    loaded[f.name] = _from_yaml(loaded[f.name], f.type, f.metadata.get("auto", False))
                except ValueError as err:
                    parser.error(f"--config {path}: {f.name}: {err}")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if values.get("resume") == "latest":  # diffusers' word for it
        values["resume"] = "auto"
    for f in dataclasses.fields(Config):
        if f.metadata.get("required") and not values.get(f.name):
            parser.error(f"--{f.name} is required")
        if f.metadata.get("choices") and f.name in values and values[f.name] not in f.metadata["choices"]:
            parser.error(f"{f.name}: {values[f.name]!r} is not one of {f.metadata['choices']}")
        if f.name not in values or values[f.name] == "auto" and f.metadata.get("auto"):
            continue
        if f.type == "float" and not math.isfinite(values[f.name]):
            parser.error(f"--{f.name} {values[f.name]!r}: must be a finite number")
        for bound, (outside, wording) in BOUNDS.items():
            if bound in f.metadata and outside(values[f.name], f.metadata[bound]):
                parser.error(f"--{f.name} {values[f.name]!r}: must be {wording} {f.metadata[bound]}")
    return Config(**values)


MAX_YAML_BYTES = 2**20  # a run's config.yaml is about 3 KB


def read_yaml(path: Path):
    """A config file as plain data. Config files come from other people (a shared recipe, a copied run folder),
    so one may hold at most MAX_YAML_BYTES and no aliases: nine nested aliases make a 500-byte file stand for a
    billion values ("billion laughs"), which printing or comparing one option expands. Raises ValueError (or
    yaml.YAMLError for bad syntax)."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{size} bytes, more than the {MAX_YAML_BYTES} a config file may have (MAX_YAML_BYTES)")
    text = path.read_text()
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError(f"line {event.start_mark.line + 1}: a YAML alias (*{event.anchor}); write the value out instead")
    return yaml.safe_load(text)


def save_config(config: Config, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)
