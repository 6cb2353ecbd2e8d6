"""A run with the CurvatureMonitor ends bit-for-bit where the same run without it ends."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from nncurv.callbacks import (
    CurvatureMetric,
    CurvatureMonitor,
    InformationMetric,
    MetricOutput,
    SpectralDensityMetric,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.test_callback_common import QUIET, make_trainer, one_thread  # noqa: F401

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    *[pytest.mark.filterwarnings(q) for q in QUIET],
    pytest.mark.filterwarnings("ignore:CurvatureMonitor. information/"),  # indefinite: NaN
]

NAMES = ["top_eig", "min_eig", "trace", "gradient", "layers", "diagonal", "jacobian"]


def all_metrics() -> list[Any]:
    info = InformationMetric(slq_steps=8, tic_probes=2, tic_max_iter=10)
    return [*NAMES, SpectralDensityMetric(10, figure=False), info]


class Disturbing(CurvatureMetric):
    """Negative control: nudges a BatchNorm statistic in place, which the check must notice."""

    name = "disturbing"

    def compute(self, ctx: Any) -> MetricOutput:
        ctx.problem.model.net[1].running_var.mul_(1 + 1e-6)
        return MetricOutput(scalars={"x": 0.0})


class Net(pl.LightningModule):
    """BatchNorm, dropout and Adam: every kind of state a careless callback could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
        )
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)


def _fit(tmp_path: Any, with_callback: bool, case: str, metrics: Any = None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = Net()
    X, y = _data()
    # shuffling draws from the global RNG at every epoch: any RNG use by the callback shows
    train = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(X[:16], y[:16]), batch_size=8)
    cb_kwargs: dict[str, Any] = {
        "metrics": metrics or all_metrics(),
        "every_n_steps": 1,
        "at_fit_start": True,
        "at_fit_end": True,
        "validation": True,
        "trace_matvecs": 6,
    }
    trainer_kwargs: dict[str, Any] = {"max_epochs": 2, "deterministic": True}
    if case == "batchnorm-batch":
        cb_kwargs["batchnorm"] = "batch"
    elif case == "dropout-on":
        cb_kwargs["dropout"] = "on"
    elif case == "accumulate":
        trainer_kwargs["accumulate_grad_batches"] = 3
        cb_kwargs["probe"] = "fresh"
    elif case == "bf16-mixed":
        trainer_kwargs["precision"] = "bf16-mixed"
        cb_kwargs["probe"] = 2
    callbacks = [CurvatureMonitor(**cb_kwargs)] if with_callback else []
    trainer = make_trainer(
        tmp_path / str(with_callback), callbacks, limit_val_batches=2, **trainer_kwargs
    )
    trainer.fit(model, train, val)
    if with_callback:
        assert callbacks[0]._num_calls > 3
        if metrics is None:
            assert torch.isfinite(trainer.callback_metrics["curvature/hessian/top_eig_0"])
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "optimizer": trainer.optimizers[0].state_dict(),
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
        "global_step": trainer.global_step,
    }


@pytest.mark.parametrize(
    "case", ["batchnorm-eval", "batchnorm-batch", "dropout-on", "accumulate", "bf16-mixed"]
)
def test_weights_bit_for_bit_identical_with_and_without_callback(tmp_path, case):
    ref = _fit(tmp_path, False, case)
    got = _fit(tmp_path, True, case)
    _assert_identical(got, ref)


def test_invariance_check_catches_a_disturbing_metric(tmp_path):
    ref = _fit(tmp_path, False, "accumulate")
    got = _fit(tmp_path, True, "accumulate", metrics=[Disturbing()])
    with pytest.raises(AssertionError, match="running_var"):
        _assert_identical(got, ref)


def _assert_identical(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["global_step"] == ref["global_step"]
    for k, v in ref["state"].items():  # parameters and BatchNorm buffers
        assert torch.equal(got["state"][k], v), k
    for k, v in ref["grads"].items():
        assert (got["grads"][k] is None) == (v is None), k
        assert v is None or torch.equal(got["grads"][k], v), k
    for pid, st in ref["optimizer"]["state"].items():  # Adam moments
        for name, t in st.items():
            assert torch.equal(got["optimizer"]["state"][pid][name], t), (pid, name)
    assert torch.equal(got["rng"], ref["rng"])  # global RNG consumed identically
    assert got["training"] == ref["training"]
