"""A digits classifier (MLP or small CNN) as a LightningModule, and its data loaders.

Shared by ``examples/train_with_curvature_monitor.py``, ``benchmarks/callback_overhead.py`` and
``nncurv report`` (which loads the checkpoint the example saves)::

    from examples.digits import DigitsClassifier, make_loader
    model = DigitsClassifier.load_from_checkpoint("outputs/curvature_monitor/digits_mlp.ckpt")
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsClassifier", "make_loader", "load_digits_tensors"]


def load_digits_tensors(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as ``(X, y)``: pixels scaled to [0, 1], 70/30 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=digits.target)
    sel = torch.as_tensor(tr if split == "train" else te)
    return X[sel], y[sel]


def make_loader(
    split: str = "train", *, batch_size: int = 64, shuffle: bool | None = None, seed: int = 0
) -> DataLoader:
    """A ``DataLoader`` of flat 64-pixel digits (the CNN reshapes them itself)."""
    X, y = load_digits_tensors(split, seed)
    gen = torch.Generator().manual_seed(seed)
    shuffle = split == "train" if shuffle is None else shuffle
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 10),
    )


def _cnn(channels: int) -> nn.Module:
    c = channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c * 4, 10),
    )  # fmt: skip


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy classifier of 8×8 digits trained with plain SGD.

    Args:
        arch: ``"mlp"`` (two tanh layers of ``width`` units) or ``"cnn"`` (two conv layers of
            ``width`` and ``2 * width`` channels).
        width: Hidden units or channels.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(
        self, arch: str = "mlp", width: int = 64, lr: float = 0.1, momentum: float = 0.0
    ) -> None:
        super().__init__()
        if arch not in ("mlp", "cnn"):
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
        self.save_hyperparameters()
        self.net = _mlp(width) if arch == "mlp" else _cnn(width // 4 or 1)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.loss_fn(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
