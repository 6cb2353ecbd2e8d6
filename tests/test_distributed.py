"""Two gloo processes on CPU hold the operator of the union of their data."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nncurv import CurvatureProblem, GGNOperator, HessianOperator

pytestmark = pytest.mark.distributed


def _data(reduction: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(13, 4, dtype=torch.float64)  # uneven: rank 0 gets 7 samples, rank 1 gets 6
    y = torch.randint(0, 3, (13,))
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


def _worker(rank: int, world: int, store: str, out: str) -> None:
    # a file rendezvous: no fixed port that another process could take in the meantime
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for reduction in ["mean", "sum"]:
            model, loss_fn, X, y = _data(reduction)
            idx = torch.arange(rank, 13, world)
            # each rank's local data: a loader with batches of 3 (last one short)
            ds = torch.utils.data.TensorDataset(X[idx], y[idx])
            loader = torch.utils.data.DataLoader(ds, batch_size=3)
            problem = CurvatureProblem(model, loss_fn, loader, reduction=reduction)
            assert problem.distributed and problem.num_samples == 13
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[f"H_{reduction}"] = HessianOperator(problem).to_dense()
                results[f"H_rev_{reduction}"] = HessianOperator(
                    problem, mode="reverse-over-reverse"
                ).to_dense()
                results[f"G_{reduction}"] = GGNOperator(problem).to_dense()
            loss, grad = problem.loss_and_gradient()
            results[f"loss_{reduction}"] = loss
            results[f"grad_{reduction}"] = grad
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process_on_union(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    got = torch.load(out)
    for reduction in ["mean", "sum"]:
        model, loss_fn, X, y = _data(reduction)
        problem = CurvatureProblem(model, loss_fn, (X, y), reduction=reduction)
        H = HessianOperator(problem).to_dense()
        G = GGNOperator(problem).to_dense()
        loss, grad = problem.loss_and_gradient()
        for key, ref in [("H", H), ("H_rev", H), ("G", G), ("loss", loss), ("grad", grad)]:
            diff = float((got[f"{key}_{reduction}"] - ref).abs().max())
            assert diff <= 1e-10 * max(1.0, float(ref.abs().max())), (key, reduction, diff)


def _leak_worker(rank: int, world: int, store: str, out: str) -> None:
    import os

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # the first torch.func.grad imports torch._dynamo and with it torch.distributed.nn
    x = torch.randn(3, dtype=torch.float64)
    torch.func.vjp(torch.func.grad(lambda p: (p**3).sum()), x)[1](torch.ones_like(x))
    dist.destroy_process_group()
    import torch.distributed.nn.functional as dnn

    held = [
        name
        for name in dir(dnn)
        if any(
            isinstance(d, dist.ProcessGroup)
            for d in getattr(dnn.__dict__[name], "__defaults__", None) or ()
        )
    ]
    threads = []
    if os.path.isdir("/proc/self/task"):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                threads.append(f.read().strip())
    torch.save({"held": held, "gloo_threads": [t for t in threads if "gloo" in t]}, f"{out}{rank}")


def test_destroy_process_group_frees_the_group_after_torch_func(tmp_path):
    """A group destroyed after torch.func was first used is freed (its gloo threads stop).

    Otherwise its threads outlive the group and can abort the process at exit.
    """
    out = str(tmp_path / "rank")
    mp.spawn(_leak_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}{rank}")
        assert got == {"held": [], "gloo_threads": []}, (rank, got)
