"""Load a checkpoint's generators for inference and translate [0,1] slices. Used by validation tests,
train.translate, train.evaluate and the dashboard; only .safetensors are read, nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from train import rundir
from train.networks import build_generator

DIRECTIONS = {"t1-to-t2": "t1_to_t2", "t2-to-t1": "t2_to_t1"}


class CheckpointError(ValueError):
    pass


def read_checkpoint_info(checkpoint: Path) -> dict:
    path = Path(checkpoint) / rundir.CHECKPOINT_INFO
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint folder (no {rundir.CHECKPOINT_INFO}); "
                              f"expected RUN/checkpoints/step-NNNNNNN")
    try:
        info = json.loads(path.read_text())
        info["generator"]["arch"], info["generator"]["size"], info["generator"]["ngf"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint description ({err})") from None
    return info


def load_generator(checkpoint: Path, direction: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """direction: 't1_to_t2' or 't2_to_t1' (or the CLI spelling 't1-to-t2'). Returns (network in eval mode, info)."""
    direction = DIRECTIONS.get(direction, direction)
    if direction not in rundir.GENERATORS:
        raise CheckpointError(f"unknown direction {direction!r}: choose t1-to-t2 or t2-to-t1")
    info = read_checkpoint_info(checkpoint)
    spec = info["generator"]
    weights = Path(checkpoint) / rundir.GENERATORS[direction]
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint}: no {weights.name}")
    net = build_generator(spec["arch"], spec["size"], spec["ngf"])
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights}: cannot load the generator ({err})") from None
    return net.to(device).eval(), info


@torch.no_grad()
def translate(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[0,1] slices (N,1,H,W) -> [0,1] translations; the network works in [-1,1]."""
    return ((net(images * 2 - 1).float() + 1) / 2).clamp(0, 1)
