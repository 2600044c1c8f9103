"""The reference CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix) timed beside this project's step, from a local
checkout that is never copied here: `python bench/train_bench.py --reference PATH`.

The reference runs unmodified, as its README says to run it (`python train.py ...` in the checkout), in an
environment of its own: a venv that sees this project's packages (the same torch build, NumPy, Pillow, wandb)
and adds what only the reference needs, torchvision pinned to the installed torch, and dominate. PyPI's
torchvision wheels are built against the CUDA torch: beside a CPU torch, `import torchvision` fails in
torchvision._meta_registrations ('operator torchvision::nms does not exist'), which registers fake kernels for
detection ops the reference never calls. The environment's sitecustomize.py stands an empty module in for that
one; torchvision.transforms, all the reference uses, is pure Python.

Its time per iteration is the compute time its train.py logs (`time:` in loss_log.txt: set_input plus
optimize_parameters, data loading excluded), per image, times the batch size.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sysconfig
import tempfile
import venv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# torchvision 0.28 on a CPU torch: skip the fake-kernel registrations of the C++ ops that failed to load
SITECUSTOMIZE = '''import sys, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
'''
NEVER = str(10**9)  # a frequency that never comes: no image dumps or checkpoints inside the timed iterations
TIME = re.compile(r"\btime: ([0-9.]+)")


def prepare_env(env_dir: Path) -> Path:
    """The reference's Python, creating its environment on first use (about 10 s and one torchvision download)."""
    env_dir = env_dir.absolute()  # the reference runs in its checkout (not resolve(): bin/python is a link out of the venv)
    python = env_dir / "bin" / "python"
    if (env_dir / ".ready").exists():
        return python
    partial = env_dir.with_name(env_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    venv.create(partial, with_pip=True)
    site = Path(subprocess.check_output([partial / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this project's torch, numpy, Pillow, wandb
    pin = partial / "torch-pin.txt"
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # torchvision for this torch, never a second torch
    subprocess.run([partial / "bin" / "python", "-m", "pip", "install", "-q", "-c", pin, "torchvision", "dominate"], check=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    shutil.rmtree(env_dir, ignore_errors=True)
    partial.rename(env_dir)
    # after the rename only bin/pip's shebang names the old folder; this bench calls bin/python alone
    (env_dir / ".ready").write_text("")
    return python


def check_checkout(checkout: Path) -> None:
    if not (checkout / "train.py").is_file() or not (checkout / "models" / "cycle_gan_model.py").is_file():
        raise SystemExit(f"--reference {checkout}: not a checkout of junyanz/pytorch-CycleGAN-and-pix2pix "
                         "(no train.py and models/cycle_gan_model.py)")


def write_images(root: Path, size: int, count: int) -> None:
    """Unpaired trainA/trainB folders of random 8-bit slices: the time of a step does not depend on the pixels."""
    rng = np.random.default_rng(0)
    for domain in ("trainA", "trainB"):
        (root / domain).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / domain / f"{i:03d}.png")


def options(config, size: int, iterations: int) -> list[str]:
    """The reference's train.py flags for the network, loss and batch this bench's config asks of ours."""
    if size not in (128, 256) or config.generator != "unet" or config.unet_depth not in (0, int(np.log2(size))):
        raise SystemExit(f"--reference compares full-depth U-Nets at 128 or 256 (its unet_128, unet_256); got {config.generator} "
                         f"depth {config.unet_depth} at {size}: pass --config train/recipes/seed.yaml and --sizes 256 or 128")
    batch = config.batch_size
    return ["--model", "cycle_gan", "--netG", f"unet_{size}", "--netD", "basic", "--ngf", str(config.ngf), "--ndf", str(config.ndf),
            "--input_nc", "1", "--output_nc", "1", "--batch_size", str(batch), "--preprocess", "none",
            "--gan_mode", {"bce": "vanilla"}.get(config.gan_loss, config.gan_loss), "--lambda_identity", str(config.lambda_identity),
            "--num_threads", "0", "--n_epochs", "1", "--n_epochs_decay", "0", "--max_dataset_size", str(iterations * batch),
            "--print_freq", str(batch), "--display_freq", NEVER, "--save_latest_freq", NEVER, "--save_epoch_freq", NEVER, "--no_flip"]


def run(python: Path, checkout: Path, config, size: int, steps: int, warmup: int = 2) -> dict:
    """Time `steps` iterations of the reference's train.py after `warmup` ones, in a fresh process.
    Returns the median seconds per iteration and the process's peak RSS."""
    iterations = steps + warmup
    with tempfile.TemporaryDirectory(prefix="reference-") as work:
        work = Path(work)
        write_images(work / "data", size, iterations * config.batch_size)
        command = [python, "train.py", "--dataroot", work / "data", "--name", "bench", "--checkpoints_dir", work / "checkpoints",
                   *options(config, size, iterations)]
        with open(work / "output.txt", "w") as output:
            proc = subprocess.Popen(command, cwd=checkout, stdout=output, stderr=subprocess.STDOUT,
                                    env={**os.environ, "WANDB_MODE": "disabled"})
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        log = work / "checkpoints" / "bench" / "loss_log.txt"
        times = [float(t) * config.batch_size for t in TIME.findall(log.read_text())] if log.exists() else []
        if proc.returncode or len(times) != iterations:
            tail = (work / "output.txt").read_text()[-3000:]
            raise SystemExit(f"the reference's train.py in {checkout} exited {proc.returncode} after logging {len(times)} of "
                             f"{iterations} iterations:\n{tail}")
    return {"step_s": statistics.median(times[warmup:]), "peak_rss_gib": usage.ru_maxrss / 2**20}

