"""CurvatureMonitor under DDP (2 CPU processes, gloo, ddp_spawn): the union of the probe batches."""

from __future__ import annotations

import glob
from collections.abc import Callable
from typing import Any

import pytest
import torch
from nncurv.callbacks import CurvatureMonitor, LayerCurvature, MinEigenvalue, TopEigenvalues
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.test_callback_common import (  # noqa: F401 - one_thread is a fixture
    QUIET,
    Regression,
    closed_form_gradient,
    closed_form_hessian,
    make_trainer,
    one_thread,
    read_events,
    regression_data,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.usefixtures("one_thread"),
    *[pytest.mark.filterwarnings(q) for q in QUIET],
]

P = "curvature/"


class RankSampler(torch.utils.data.Sampler):
    """Rank r reads samples r, r + world, ... (chosen here, so the test knows the union)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_log_the_values_of_the_union_batch(tmp_path):
    X, y = regression_data(32, 4)
    data = torch.utils.data.TensorDataset(X, y)

    def callbacks() -> list:
        cb = CurvatureMonitor(
            metrics=[
                TopEigenvalues(2, tol=1e-10),
                MinEigenvalue(tol=1e-10),
                "trace",
                "gradient",
                LayerCurvature(tol=1e-10),
            ],
            every_n_steps=2,
            overhead_budget=10.0,  # never binding, but the decision is broadcast from rank 0
        )
        return [cb]

    trainer, model = _fit_ddp(tmp_path, callbacks, 4, data)

    # rank r reads samples r, r+2, ...: the first batches of the two ranks (the fixed probes)
    # together hold samples 0..7.
    Xu, yu = X[:8], y[:8]
    H = closed_form_hessian(model, Xu)
    lam = torch.linalg.eigvalsh(H)
    g = closed_form_gradient(model, Xu, yu)
    expected = {
        "hessian/top_eig_0": lam[-1],
        "hessian/top_eig_1": lam[-2],
        "hessian/min_eig": lam[0],
        "hessian/trace": H.trace(),
        "gradient/norm": g.norm(),
        "gradient/curvature": g @ H @ g / (g @ g),
        "layer/lin/top_eig": lam[-1],
    }
    events = glob.glob(f"{trainer.default_root_dir}/**/events.out.tfevents.*", recursive=True)
    assert len(events) == 1, events  # only rank 0 writes
    scalars, _ = read_events(trainer.logger.log_dir)
    for key, ref in expected.items():
        got = scalars[P + key]
        assert [s for s, _ in got] == [2, 4], (key, got)  # once per step: no duplicate writer
        for _, v in got:
            assert v == pytest.approx(float(ref), rel=1e-6), key
        # callback_metrics come back from rank 0 to the launching process
        assert float(trainer.callback_metrics[P + key]) == pytest.approx(float(ref), rel=1e-10)
    # the single-process value on one rank's batch differs: the test can tell them apart
    lam0 = torch.linalg.eigvalsh(closed_form_hessian(model, X[0:8:2]))[-1]
    assert abs(float(lam0) - float(lam[-1])) > 1e-3


def _fit_ddp(
    root: Any, callbacks: Callable[[], list], max_steps: int, data: Any, **fit_kwargs: Any
) -> tuple[Any, Regression]:
    """A 2-process ddp_spawn fit of linear regression at lr = 0; ``(trainer, model)``.

    Run once more, with new callbacks, in two cases that are not the code under test:
    - the port Lightning picked was taken before the ranks bound it;
    - a rank aborted at interpreter exit, after its work. Lightning destroys only NCCL process
      groups at exit, so a gloo group's threads are still running when the C++ statics are torn
      down, which now and then ends in std::terminate (SIGABRT).
    """
    for attempt in range(2):
        model = Regression(4, lr=0.0)
        cbs = callbacks()
        trainer = make_trainer(
            root / f"try{attempt}",
            cbs,
            max_steps=max_steps,
            precision="64-true",
            strategy="ddp_spawn",
            devices=2,
            use_distributed_sampler=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in cbs),
        )
        try:
            trainer.fit(
                model,
                torch.utils.data.DataLoader(data, batch_size=4, sampler=RankSampler(32)),
                **fit_kwargs,
            )
            return trainer, model
        except Exception as err:
            text = str(err).lower()
            if attempt or not ("address already in use" in text or "signal sigabrt" in text):
                raise
    raise AssertionError("unreachable")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_resume_under_ddp_keeps_every_ranks_probe(tmp_path):
    """The checkpoint holds the probe batches of both ranks; resumed, the union is the same."""
    X, y = regression_data(32, 4)
    data = torch.utils.data.TensorDataset(X, y)
    cb = CurvatureMonitor(metrics=[TopEigenvalues(tol=1e-10)], every_n_steps=2)

    def first_callbacks() -> list:
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
        return [CurvatureMonitor(metrics=[TopEigenvalues(tol=1e-10)], every_n_steps=2), ck]

    first, _ = _fit_ddp(tmp_path / "a", first_callbacks, 2, data)
    ckpt = sorted(glob.glob(str(tmp_path / "ck" / "*.ckpt")))[-1]
    saved = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]["probes_by_rank"]
    assert [tuple(b[0].shape) for b in (p[0] for p in saved)] == [(4, 4), (4, 4)]
    second, _ = _fit_ddp(
        tmp_path / "b",
        lambda: [CurvatureMonitor(metrics=[TopEigenvalues(tol=1e-10)], every_n_steps=2)],
        4,
        data,
        ckpt_path=ckpt,
    )
    key = P + "hessian/top_eig_0"
    before, _ = read_events(first.logger.log_dir)
    after, _ = read_events(second.logger.log_dir)
    # lr = 0: the parameters never move, so the union of the probes gives the same value
    lam = float(torch.linalg.eigvalsh(closed_form_hessian(Regression(4), X[:8]))[-1])
    assert [s for s, _ in before[key]] == [2] and [s for s, _ in after[key]] == [4]
    assert before[key][0][1] == pytest.approx(lam, rel=1e-6)
    assert after[key][0][1] == pytest.approx(lam, rel=1e-6)
