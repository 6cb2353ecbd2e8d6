"""Guards that keep the user's module and the global state exactly as they were.

Every analysis in nncurv runs inside :func:`untouched`: submodule train/eval flags (and the
BatchNorm ``track_running_stats`` switch used for batch-statistics mode) are restored in
``finally``, the global RNG streams of CPU and the model's accelerator are forked, and gradient
mode is enabled (outside inference mode) so analyses also work from validation hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import nn

__all__ = ["untouched", "apply_module_policy", "BatchNormPolicy", "DropoutPolicy", "is_batchnorm"]

BatchNormPolicy = Literal["eval", "batch"]
DropoutPolicy = Literal["off", "on"]

_BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (1d/2d/3d, lazy and sync variants)."""
    return isinstance(module, _BN_TYPES)


def _devices_of(modules: Iterable[nn.Module]) -> list[torch.device]:
    devs = {
        t.device for m in modules for t in (*m.parameters(), *m.buffers()) if t.device.type != "cpu"
    }
    return sorted(devs, key=str)


@contextlib.contextmanager
def untouched(*modules: nn.Module) -> Iterator[None]:
    """Run a block with the modules' flags and the global RNG restored afterwards.

    Restores every submodule's ``training`` flag and BatchNorm ``track_running_stats``; forks
    the CPU RNG and the RNG of every accelerator the modules live on; enables gradients and
    leaves inference mode for the duration of the block.
    """
    # (BatchNorm layers only: a getattr miss goes through nn.Module.__getattr__, which raises
    # and catches an AttributeError, for every other module)
    saved = [
        (m, m.training, m.track_running_stats if isinstance(m, _BN_TYPES) else None)
        for root in modules
        for m in root.modules()
    ]
    # no tensor lives on a CUDA device before CUDA is initialised: skip the scan then
    accel = _devices_of(modules) if torch.cuda.is_initialized() else []
    cuda_devices = [d for d in accel if d.type == "cuda"]
    try:
        with (
            torch.random.fork_rng(devices=cuda_devices, enabled=True),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            yield
    finally:
        # (only what changed is written back: nn.Module.__setattr__ is slow)
        for m, training, trs in saved:
            if m.training is not training:
                m.training = training
            if trs is not None and m.track_running_stats is not trs:
                m.track_running_stats = trs  # type: ignore[assignment]


def apply_module_policy(
    model: nn.Module, *, batchnorm: BatchNormPolicy = "eval", dropout: DropoutPolicy = "off"
) -> None:
    """Set BatchNorm and dropout modes for an analysis (call inside :func:`untouched`).

    Args:
        model: The module whose submodules are switched.
        batchnorm: ``"eval"`` uses the running statistics; ``"batch"`` uses the statistics of the
            batch without updating the running ones.
        dropout: ``"off"`` disables dropout; ``"on"`` keeps dropout modules as they are (their
            masks then come from the forked RNG and differ between evaluations).
    """
    if batchnorm not in ("eval", "batch"):
        raise ValueError(f"batchnorm must be 'eval' or 'batch', got {batchnorm!r}")
    if dropout not in ("off", "on"):
        raise ValueError(f"dropout must be 'off' or 'on', got {dropout!r}")
    for m in model.modules():
        if is_batchnorm(m):
            if batchnorm == "eval":
                m.training = False
            else:
                m.training = True
                m.track_running_stats = False  # type: ignore[assignment]
        elif dropout == "off" and isinstance(m, _DROPOUT_TYPES):
            m.training = False
