"""Shared pieces of the CurvatureMonitor tests (no tests here; importable for ddp_spawn)."""

from __future__ import annotations

import glob
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)

QUIET = [
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
    "ignore:.*treespec, LeafSpec.*",
    "ignore:.*GPU available but not used.*",
    "ignore:.*predefined seed.*",
    "ignore:.*val_dataloader.*",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models run fastest (and least noisily on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def regression_data(n: int = 32, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        n, 1, generator=gen, dtype=torch.float64
    )
    return X, y


class Regression(pl.LightningModule):
    """Linear regression with mean squared error, trained with SGD (``lr=0`` keeps it fixed)."""

    def __init__(self, d: int = 4, lr: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(d, 1).double()
        self.loss_fn = nn.MSELoss()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def closed_form_hessian(model: Regression, X: torch.Tensor) -> torch.Tensor:
    """H = 2 [X 1]^T [X 1] / N for the weights and the bias of a linear model with MSE."""
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    return 2 * A.T @ A / X.shape[0]


def closed_form_gradient(model: Regression, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    w = torch.cat([model.lin.weight.detach().reshape(-1), model.lin.bias.detach()])
    return 2 * A.T @ (A @ w - y.reshape(-1)) / X.shape[0]


def loader(X: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle)


def make_trainer(tmp_path: Any, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "default_root_dir": str(tmp_path),
        "logger": TensorBoardLogger(str(tmp_path), name="tb", version=0),
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def read_events(log_dir: str) -> Any:
    """Every scalar of every event file under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    scalars: dict[str, list[tuple[int, float]]] = {}
    tags: dict[str, set[str]] = {"histograms": set(), "images": set(), "tensors": set()}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        acc = EventAccumulator(path, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    return scalars, tags
