"""The training-speed benches. bench/train_bench.py --reference: the reference CycleGAN's own environment, its
flags, its logged times and the alternating ratio, against a stand-in checkout whose train.py logs known times
the way the reference's does. bench/upsample_bench.py: the reformulation it times computes the same function.
bench/optimizer_bench.py: the state it reports is Adam's two fp32 moments per parameter."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# Logs `time:` lines as the reference's Visualizer.print_current_losses does, one per --print_freq images, and
# imports what the reference imports from its environment: torchvision.transforms (PyPI's CUDA-built wheel beside
# this CPU torch) and dominate.
STAND_IN = textwrap.dedent('''
    import argparse, pathlib, sys
    import dominate, torch, torchvision.transforms as transforms
    parser = argparse.ArgumentParser()
    for flag in ("--dataroot", "--name", "--checkpoints_dir", "--netG", "--gan_mode", "--ngf", "--ndf"):
        parser.add_argument(flag)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--max_dataset_size", type=int)
    parser.add_argument("--lambda_identity", type=float)
    opt, _ = parser.parse_known_args()
    transforms.ToTensor()
    if opt.ngf == "13":
        sys.exit("refusing ngf 13")
    out = pathlib.Path(opt.checkpoints_dir, opt.name)
    out.mkdir(parents=True)
    images = len(list(pathlib.Path(opt.dataroot, "trainA").glob("*.png")))
    with open(out / "loss_log.txt", "w") as log:
        for i in range(images // opt.batch_size):
            log.write(f"[Rank 0] (epoch: 1, iters: {(i + 1) * opt.batch_size}, time: {0.25 if i >= 2 else 9.0:.3f}, data: 0.001) , D_A: 0.5\\n\\n")
    print("stand-in ran with", opt.netG, "torch", torch.__version__)
''')


@pytest.fixture(scope="module")
def reference_env(tmp_path_factory):
    """The reference's environment, made once by the bench's own setup (pip installs torchvision and dominate)."""
    env = tmp_path_factory.mktemp("reference") / "env"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(ROOT / "bench")
        python = importlib.import_module("reference_cyclegan").prepare_env(env)
    return env, python


def stand_in_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "models").mkdir(parents=True)
    (checkout / "models" / "cycle_gan_model.py").write_text("")
    (checkout / "train.py").write_text(STAND_IN)
    return checkout


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "bench/train_bench.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_reference_environment_imports_torchvision_beside_the_cpu_torch(reference_env):
    env, python = reference_env
    done = subprocess.run([python, "-c", "import torch, torchvision.transforms as T, dominate; print(torch.__version__, T.Normalize)"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    import torch
    assert done.stdout.split()[0] == torch.__version__  # this project's torch, not a second one
    assert not list(env.glob("lib/python*/site-packages/torch"))


def test_reference_and_ours_alternate_and_the_ratio_is_of_their_median_steps(reference_env, tmp_path):
    env, _ = reference_env
    checkout = stand_in_checkout(tmp_path)
    # paths relative to where the bench is started, as a user types them: the reference itself runs in its checkout
    done = bench("--reference", os.path.relpath(checkout, ROOT), "--reference-env", os.path.relpath(env, ROOT), "--sizes", 128,
                 "--steps", 2, "--rounds", 2,
                 "--config", "train/recipes/seed.yaml", "--ngf", 8, "--ndf", 8)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("round")]
    assert [line.split(":")[0] + (" reference" if "reference" in line else " ours") for line in lines] == \
        ["round 1 reference", "round 1 ours", "round 2 reference", "round 2 ours"]
    # the stand-in logs 9 s for its two warm-up iterations, then 0.25 s: the median of the timed ones
    assert all("reference unet_128 ngf 8 ndf 8 128^2 batch 1: 0.25 s/step" in line for line in lines[::2])
    ours = [float(re.search(r"batch 1: ([0-9.]+) s/step", line).group(1)) for line in lines[1::2]]
    ratios = re.search(r"over the reference's: ([0-9.]+)x \(rounds: ([0-9.]+), ([0-9.]+)\)", done.stdout).groups()
    for step_s, ratio in zip(ours, ratios[1:]):
        assert float(ratio) == pytest.approx(0.25 / step_s, rel=0.05, abs=0.01)


def run_with_stand_ins(monkeypatch, argv, ours_s):
    """train_bench.main() with the reference and our step replaced by stand-ins that take 1 s and the given
    times: the order of runs (who, size, mixed precision, channels_last, ngf) and what is printed come back.
    The processes themselves are tested above."""
    monkeypatch.syspath_prepend(ROOT / "bench")
    train_bench = importlib.import_module("train_bench")
    order, ours_s = [], iter(ours_s)
    monkeypatch.setattr(train_bench.reference_cyclegan, "check_checkout", lambda path: None)
    monkeypatch.setattr(train_bench.reference_cyclegan, "prepare_env", lambda env: "python")
    monkeypatch.setattr(train_bench.reference_cyclegan, "run", lambda python, checkout, config, size, steps:
                        order.append(("reference", size, config.mixed_precision)) or {"step_s": 1.0, "peak_rss_gib": 1.0})
    monkeypatch.setattr(train_bench, "matmul_flops", lambda: 1e9)
    monkeypatch.setattr(train_bench, "run_ours", lambda size, steps, config: order.append(
        ("ours", size, config.mixed_precision, config.channels_last, config.ngf)) or {
        "batch": 1, "step_s": (step_s := next(ours_s)), "images_per_s": 2 / step_s, "flops_per_step": 1e9, "flop_per_s": 1e9 / step_s,
        "peak_rss_gib": 1.0})
    monkeypatch.setattr(sys, "argv", ["train_bench.py", *argv])
    train_bench.main()
    return order


def test_rounds_run_outermost_so_every_size_meets_the_same_drift(monkeypatch, tmp_path, capsys):
    """With several sizes, round 1 times every size (reference, then ours) before round 2 starts; each size's
    ratio is the median of its own rounds."""
    order = run_with_stand_ins(monkeypatch, ["--reference", str(tmp_path), "--sizes", "128", "256", "--rounds", "2",
                                             "--config", "train/recipes/seed.yaml"], [0.5, 1.0, 0.25, 2.0])
    assert [run[:2] for run in order] == [(who, size) for _ in (1, 2) for size in (128, 256) for who in ("reference", "ours")]
    printed = capsys.readouterr().out
    assert "128^2: this project's images/s over the reference's: 3.00x (rounds: 2.00, 4.00)" in printed
    assert "256^2: this project's images/s over the reference's: 0.75x (rounds: 1.00, 0.50)" in printed


def test_also_configurations_run_in_the_same_rounds_each_with_its_own_ratio(monkeypatch, tmp_path, capsys):
    """--also adds configurations of ours timed right after the first, inside every round, with the options
    changed as given and the rest of the command line kept."""
    order = run_with_stand_ins(monkeypatch, ["--reference", str(tmp_path), "--sizes", "256", "--rounds", "2",
                                             "--config", "train/recipes/seed.yaml", "--ngf", "16",
                                             "--also", "mixed_precision=bf16,channels_last=true,ngf=8"], [0.5, 0.25, 0.4, 0.2])
    assert order == [("reference", 256, ""), ("ours", 256, "", False, 16), ("ours", 256, "bf16", True, 8)] * 2
    printed = capsys.readouterr().out
    assert "ngf 8 ndf 64 with mixed_precision=bf16,channels_last=true,ngf=8 256^2 batch 1: 0.25 s/step" in printed
    assert "256^2: this project's images/s over the reference's: 2.25x (rounds: 2.00, 2.50)" in printed
    assert ("256^2 with mixed_precision=bf16,channels_last=true,ngf=8: this project's images/s over the reference's: 4.50x "
            "(rounds: 4.00, 5.00)") in printed


@pytest.mark.parametrize("also", ["bf16", "mixed_precision=", "mixed_precision=bf16,,ngf=8"])
def test_also_that_is_not_key_value_pairs_is_refused_by_name(also):
    done = bench("--sizes", 64, "--also", also)
    assert done.returncode == 2
    assert f"--also {also}: expected trainer options as key=value pairs" in done.stderr


def test_also_with_an_unknown_trainer_option_is_refused():
    done = bench("--sizes", 64, "--also", "mixed_precisoin=bf16")
    assert done.returncode != 0
    assert "mixed_precisoin" in done.stderr


def test_reference_runs_at_the_configs_network_loss_and_batch(reference_env, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT / "bench")
    reference_cyclegan = importlib.import_module("reference_cyclegan")
    from train.config import load_config

    def seed(*options):
        return load_config(["--data", "-", "--out", "-", "--config", "train/recipes/seed.yaml", *options])

    flags = reference_cyclegan.options(seed("--ngf", "8", "--ndf", "16", "--batch_size", "2"), 256, iterations=3)
    assert flags[-1] == "--no_flip"
    pairs = dict(zip(flags[:-1:2], flags[1:-1:2]))
    assert {k: pairs[k] for k in ("--netG", "--netD", "--ngf", "--ndf", "--batch_size", "--gan_mode", "--lambda_identity",
                                  "--max_dataset_size", "--print_freq", "--num_threads")} == \
        {"--netG": "unet_256", "--netD": "basic", "--ngf": "8", "--ndf": "16", "--batch_size": "2", "--gan_mode": "vanilla",
         "--lambda_identity": "0.5", "--max_dataset_size": "6", "--print_freq": "2", "--num_threads": "0"}
    checkout = stand_in_checkout(tmp_path)
    result = reference_cyclegan.run(reference_env[1], checkout, seed("--ngf", "8", "--batch_size", "2"), 256, steps=1)
    assert result["step_s"] == pytest.approx(0.5)  # 0.25 s per image, batch 2
    assert result["peak_rss_gib"] > 0
    with pytest.raises(SystemExit, match=f"train.py in {checkout} exited 1 after logging 0 of 3(.|\n)*refusing ngf 13"):
        reference_cyclegan.run(reference_env[1], checkout, seed("--ngf", "13"), 128, steps=1)


def test_reference_refuses_networks_it_does_not_have_before_setting_anything_up(tmp_path):
    checkout = stand_in_checkout(tmp_path)
    env = tmp_path / "never-made"
    done = bench("--reference", checkout, "--reference-env", env, "--sizes", 128, timeout=120)  # the default: U-Net depth 3
    assert done.returncode != 0 and "--reference compares full-depth U-Nets" in done.stderr
    done = bench("--reference", tmp_path, "--reference-env", env, "--sizes", 128, "--config", "train/recipes/seed.yaml", timeout=120)
    assert done.returncode != 0 and f"--reference {tmp_path}: not a checkout" in done.stderr
    assert not env.exists() and not env.with_name("never-made.partial").exists()


def test_the_sub_pixel_reformulation_timed_by_upsample_bench_is_the_transposed_convolution(monkeypatch):
    import torch
    monkeypatch.syspath_prepend(ROOT / "bench")
    upsample_bench = importlib.import_module("upsample_bench")
    torch.manual_seed(0)
    for cin, cout, side in ((3, 5, 1), (4, 2, 7), (6, 3, 16)):
        layer = torch.nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        x = torch.randn(2, cin, side, side)
        torch.testing.assert_close(upsample_bench.subpixel(x, layer.weight, layer.bias), layer(x), rtol=1e-5, atol=1e-5)


def test_optimizer_bench_reports_adams_two_fp32_moments_per_parameter():
    done = subprocess.run([sys.executable, "bench/optimizer_bench.py", "--ngf", "16", "--rounds", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    params = float(re.search(r"ngf 16: ([0-9.]+) M parameters", done.stdout)[1]) * 1e6
    fused = re.search(r"fused Adam, fp32 state \(the trainer's\): ([0-9.e+-]+) s/step, state ([0-9.]+) MiB", done.stdout)
    step_s, state_mib = map(float, fused.groups())
    assert state_mib == pytest.approx(2 * 4 * params / 2**20, rel=0.01) and step_s > 0
