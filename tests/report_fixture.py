"""A tiny LightningModule and data function for the ``nncurv report`` tests (iris, 3 classes).

Importable by path (``tests/report_fixture.py:IrisClassifier``) or as ``tests.report_fixture``.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(batch_size: int = 50, shuffle: bool = False) -> DataLoader:
    """Standardised iris features (150 × 4) and labels, in batches."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    X = torch.tensor(iris.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(iris.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def make_bad_targets() -> list:
    """Iris-shaped features whose labels (7) lie outside the model's 3 classes."""
    return [(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.full((10,), 7))]


class IrisClassifier(pl.LightningModule):
    """4 → hidden → 3 tanh MLP (optionally with BatchNorm); the loss is ``self.loss_fn``."""

    def __init__(self, hidden: int = 8, batchnorm: bool = False, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm: nn.Module = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(4, hidden), norm, nn.Tanh(), nn.Linear(hidden, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class OtherClassifier(IrisClassifier):
    """Same hyperparameters, different layers: its checkpoint does not fit IrisClassifier."""

    def __init__(self, hidden: int = 8, batchnorm: bool = False, lr: float = 0.5) -> None:
        super().__init__(hidden, batchnorm, lr)
        self.net = nn.Sequential(nn.Linear(4, hidden + 3), nn.Tanh(), nn.Linear(hidden + 3, 3))


class NoLoss(pl.LightningModule):
    """A module without a ``loss_fn`` attribute."""

    def __init__(self, hidden: int = 8, batchnorm: bool = False, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.Identity(), nn.Tanh(), nn.Linear(hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_checkpoint(
    path: Path, *, batchnorm: bool = False, steps: int = 2, cls: type = IrisClassifier
) -> Path:
    """Train ``steps`` SGD steps on iris and save a Lightning checkpoint at ``path``."""
    torch.manual_seed(0)
    model = cls(batchnorm=batchnorm)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(shuffle=True))
    trainer.save_checkpoint(str(path))
    return path
