"""A problem zoo of lazy factories: small models, losses and data in float64.

Each case builds ``(model, loss_fn, data, problem_kwargs)`` on a device. The models are small
enough for dense ``torch.func.hessian`` / ``jacrev`` references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DTYPE = torch.float64


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3, bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2) if bn else nn.Identity()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.tanh(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(
            d_model=d, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=1))


@dataclass
class Case:
    name: str
    build_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    inputs: Callable[[torch.Generator], torch.Tensor]
    targets: Callable[[torch.Generator, int], torch.Tensor]
    n: int = 12
    kwargs: dict[str, Any] = field(default_factory=dict)
    ggn: bool = True  # GGN reference makes sense (convex loss in outputs)

    def make(self, device: torch.device | str, seed: int = 0) -> tuple[nn.Module, nn.Module, Any]:
        torch.manual_seed(seed)
        model = self.build_model().to(device=device, dtype=DTYPE)
        gen = torch.Generator().manual_seed(seed + 1)
        x = self.inputs(gen).to(device=device, dtype=DTYPE)
        y = self.targets(gen, self.n).to(device)
        if y.is_floating_point():
            y = y.to(DTYPE)
        return model, self.loss_fn, (x, y)


def _randn(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(*shape, generator=g)


def _classes(c: int) -> Callable[[torch.Generator, int], torch.Tensor]:
    return lambda g, n: torch.randint(0, c, (n,), generator=g)


def _mlp(act: type[nn.Module], out: int = 3, extra: list[nn.Module] | None = None) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(4, 5), act()]
    layers += extra or []
    layers += [nn.Linear(5, out)]
    return nn.Sequential(*layers)


def _bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _warm_bn(model: nn.Module) -> nn.Module:
    # give running statistics values other than (0, 1) so eval and batch modes differ
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


CASES: list[Case] = [
    Case(
        "mlp_tanh_mse_mean",
        lambda: _mlp(nn.Tanh),
        nn.MSELoss(),
        _randn(12, 4),
        lambda g, n: torch.randn(n, 3, generator=g),
    ),
    Case(
        "mlp_tanh_mse_sum",
        lambda: _mlp(nn.Tanh),
        nn.MSELoss(reduction="sum"),
        _randn(12, 4),
        lambda g, n: torch.randn(n, 3, generator=g),
        kwargs={"reduction": "sum"},
    ),
    Case(
        "mlp_relu_ce_mean", lambda: _mlp(nn.ReLU), nn.CrossEntropyLoss(), _randn(12, 4), _classes(3)
    ),
    Case(
        "mlp_gelu_ce_sum",
        lambda: _mlp(nn.GELU),
        nn.CrossEntropyLoss(reduction="sum"),
        _randn(12, 4),
        _classes(3),
        kwargs={"reduction": "sum"},
    ),
    Case(
        "mlp_tanh_bce_mean",
        lambda: _mlp(nn.Tanh, out=2),
        nn.BCEWithLogitsLoss(),
        _randn(12, 4),
        lambda g, n: torch.randint(0, 2, (n, 2), generator=g).double(),
    ),
    Case("cnn_ce_mean", TinyCNN, nn.CrossEntropyLoss(), _randn(12, 1, 6, 6), _classes(3)),
    Case(
        "bn_eval_ce_mean",
        lambda: _warm_bn(_bn_mlp()),
        nn.CrossEntropyLoss(),
        _randn(12, 4),
        _classes(3),
    ),
    Case(
        "bn_cnn_eval_mse_mean",
        lambda: _warm_bn(TinyCNN(bn=True)),
        nn.MSELoss(),
        _randn(12, 1, 6, 6),
        lambda g, n: torch.randn(n, 3, generator=g),
    ),
    Case(
        "dropout_off_ce_mean",
        lambda: _mlp(nn.Tanh, extra=[nn.Dropout(0.5)]),
        nn.CrossEntropyLoss(),
        _randn(12, 4),
        _classes(3),
    ),
    Case(
        "transformer_ce_mean",
        TinyTransformer,
        nn.CrossEntropyLoss(),
        _randn(6, 3, 4),
        _classes(3),
        n=6,
    ),
]

CASE_IDS = [c.name for c in CASES]


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
