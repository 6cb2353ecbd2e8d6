"""Nothing the user owns changes; bad input fails early with a clear message."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nncurv import CurvatureProblem, GGNOperator, HessianOperator, MatrixOperator
from tests.zoo import case


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "trs": {k: getattr(m, "track_running_stats", None) for k, m in model.named_modules()},
        "rng": torch.random.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    for key in ("params", "buffers"):
        for name, t in before[key].items():
            assert torch.equal(t, after[key][name]), f"{key} {name} changed"
    for name, g in before["grads"].items():
        g2 = after["grads"][name]
        assert (g is None and g2 is None) or torch.equal(g, g2), f".grad of {name} changed"
    assert before["modes"] == after["modes"], "train/eval flags changed"
    assert before["trs"] == after["trs"], "track_running_stats changed"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
    assert before["grad_enabled"] == after["grad_enabled"]


@pytest.mark.parametrize("batchnorm", ["eval", "batch"])
@pytest.mark.parametrize("name", ["bn_cnn_eval_mse_mean", "dropout_off_ce_mean"])
def test_every_operator_leaves_model_and_rng_untouched(name, batchnorm, device):
    model, loss_fn, (X, y) = case(name).make(device)
    model.train()
    model[0].eval() if isinstance(model, nn.Sequential) else model.conv.eval()  # mixed flags
    loss_fn(model(X), y).backward()  # a .grad the analysis must not touch (BN stats move here)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=5, shuffle=True
    )
    before = _snapshot(model)
    for data in [(X, y), loader]:
        for dropout in ["off", "on"]:
            problem = CurvatureProblem(
                model, loss_fn, data, batchnorm=batchnorm, dropout=dropout, cache_batches=False
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ops = [HessianOperator(problem, mode=m) for m in HessianOperator.modes[:1]]
                ops += [HessianOperator(problem, mode="reverse-over-reverse")]
                ops += [GGNOperator(problem, mode=m) for m in GGNOperator.modes]
                ops += [HessianOperator(problem)]
            for op in ops:
                v = torch.ones(op.shape[0], dtype=op.dtype, device=device)
                op @ v
                op.matmat(torch.stack([v, -v], dim=1))
            problem.loss_and_gradient()
            problem.loss()
    _assert_same(before, model)


def test_untouched_when_a_call_raises(device):
    model, _, (X, y) = case("bn_eval_ce_mean").make(device)
    model.train()
    calls = {"n": 0}

    def flaky_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("loss exploded")
        return nn.functional.cross_entropy(out, target)

    before = _snapshot(model)
    problem = CurvatureProblem(model, flaky_loss, (X, y), batchnorm="batch")
    H = HessianOperator(problem, mode="reverse-over-reverse")
    with pytest.raises(RuntimeError, match="loss exploded"):
        H @ torch.ones(H.shape[0], dtype=H.dtype, device=device)
        H @ torch.ones(H.shape[0], dtype=H.dtype, device=device)
    _assert_same(before, model)


def test_works_under_no_grad_and_inference_mode(device):
    model, loss_fn, (X, y) = case("mlp_tanh_mse_sum").make(device)
    ref = HessianOperator(CurvatureProblem(model, loss_fn, (X, y), reduction="sum")).to_dense()
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()
        H = HessianOperator(CurvatureProblem(model, loss_fn, (Xi, yi), reduction="sum"))
        dense = H.to_dense()
    assert not torch.is_inference_mode_enabled()
    torch.testing.assert_close(dense, ref)
    with torch.no_grad():
        G = GGNOperator(CurvatureProblem(model, loss_fn, (X, y), reduction="sum")).to_dense()
        assert not torch.is_grad_enabled()
    assert torch.isfinite(G).all()


# ---------------------------------------------------------------------- bad input


def test_loss_that_is_not_a_scalar():
    model, _, data = case("mlp_tanh_mse_mean").make("cpu")
    with pytest.raises(ValueError, match="scalar"):
        CurvatureProblem(model, nn.MSELoss(reduction="none"), data)


def test_model_without_trainable_parameters():
    model, loss_fn, data = case("mlp_tanh_mse_mean").make("cpu")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CurvatureProblem(model, loss_fn, data)


def test_selection_that_matches_nothing_lists_names():
    model, loss_fn, data = case("mlp_tanh_mse_mean").make("cpu")
    with pytest.raises(
        ValueError, match=r"'decoder\.\*' matches no trainable parameter.*0\.weight"
    ):
        CurvatureProblem(model, loss_fn, data, params="decoder.*")
    with pytest.raises(ValueError, match="empty selection"):
        CurvatureProblem(model, loss_fn, data, params=[])


def test_empty_data():
    model, loss_fn, _ = case("mlp_tanh_mse_mean").make("cpu")
    with pytest.raises(ValueError, match="empty"):
        CurvatureProblem(model, loss_fn, [])
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="empty"):
        CurvatureProblem(model, loss_fn, torch.utils.data.DataLoader(empty, batch_size=4))
    with pytest.raises(ValueError, match="empty"):
        CurvatureProblem(model, loss_fn, (torch.zeros(0, 4), torch.zeros(0, 3)))


def test_vectors_of_wrong_size_dtype_device():
    model, loss_fn, data = case("mlp_tanh_mse_mean").make("cpu")
    H = HessianOperator(CurvatureProblem(model, loss_fn, data))
    n = H.shape[0]
    before = H.num_matvecs
    with pytest.raises(ValueError, match=rf"shape \({n},\), got \({n + 1},\)"):
        H @ torch.zeros(n + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float64, got torch.float32"):
        H @ torch.zeros(n)
    with pytest.raises(ValueError, match="device"):
        H @ torch.zeros(n, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="shape"):
        H.matmat(torch.zeros(n + 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        H.matvec([0.0] * n)  # type: ignore[arg-type]
    assert H.num_matvecs == before


def test_unknown_mode_and_options():
    model, loss_fn, data = case("mlp_tanh_mse_mean").make("cpu")
    problem = CurvatureProblem(model, loss_fn, data)
    with pytest.raises(ValueError, match="'fast'"):
        HessianOperator(problem, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'forward-over-reverse'"):
        GGNOperator(problem, mode="forward-over-reverse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        HessianOperator(problem, chunk_size=0)
    with pytest.raises(ValueError, match="'avg'"):
        CurvatureProblem(model, loss_fn, data, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'train'"):
        CurvatureProblem(model, loss_fn, data, batchnorm="train")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Module"):
        CurvatureProblem(lambda x: x, loss_fn, data)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CurvatureProblem"):
        HessianOperator(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not initialized"):
        CurvatureProblem(model, loss_fn, data, distributed=True)


def test_loss_check_deferred_to_first_evaluation():
    model, _, data = case("mlp_tanh_mse_mean").make("cpu")
    problem = CurvatureProblem(model, nn.MSELoss(reduction="none"), data, check_loss=False)
    H = HessianOperator(problem)
    with pytest.raises(ValueError, match="scalar"):
        H @ torch.ones(H.shape[0], dtype=H.dtype)


# ------------------------------------------------------------------ data sources (review fixes)
def _bn_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    return model, X, y


def test_one_shot_iterator_is_read_once_and_kept():
    model, X, y = _bn_regression()
    parts = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    ref = HessianOperator(CurvatureProblem(model, nn.MSELoss(), parts)).to_dense()
    problem = CurvatureProblem(model, nn.MSELoss(), iter(parts))  # a generator would do the same
    assert problem.batch_sizes == [4, 4, 4]
    H = HessianOperator(problem, mode="forward-over-reverse")  # re-reads the data per product
    assert torch.allclose(H.to_dense(), ref, rtol=1e-12, atol=1e-12)
    assert float(ref.abs().max()) > 0.1  # (a re-read exhausted iterator would give zeros)
    assert torch.allclose(problem.loss(), nn.functional.mse_loss(model.eval()(X), y))


def test_a_list_of_dict_batches_is_many_batches():
    from nncurv import DictBatch

    model, X, y = _bn_regression()

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    batches = [{"x": X[:6], "labels": y[:6]}, {"x": X[6:], "labels": y[6:]}]
    problem = CurvatureProblem(
        Kw(), nn.MSELoss(), batches, batch_format=DictBatch(target_key="labels")
    )
    assert problem.batch_sizes == [6, 6]
    ref = CurvatureProblem(model, nn.MSELoss(), (X, y))
    assert torch.allclose(problem.loss(), ref.loss(), rtol=1e-12)


def test_loader_with_its_own_generator_gives_the_same_batches_every_pass():
    # with batch statistics the operator depends on which samples share a batch
    model, X, y = _bn_regression()
    g = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=4, shuffle=True, generator=g
    )
    state = g.get_state()
    problem = CurvatureProblem(model, nn.MSELoss(), loader, batchnorm="batch")
    H = HessianOperator(problem, mode="reverse-over-reverse")
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first, second = H @ v, H @ v
    assert torch.equal(first, second)
    assert torch.equal(g.get_state(), state), "the loader's generator moved"
    # and the batches are those the loader draws next, as the user would see them
    seen = [xb for xb, _ in loader]
    g.set_state(state)
    with torch.random.fork_rng():
        replay = CurvatureProblem(model, nn.MSELoss(), [(xb, yb) for xb, yb in loader])
    assert [b.inputs.shape[0] for b in replay.batches()] == [x.shape[0] for x in seen]


@pytest.mark.parametrize("mode", ["cached", "forward-over-reverse"])
def test_parameters_changed_after_construction_are_refused(mode):
    model, X, y = _bn_regression()
    problem = CurvatureProblem(model, nn.MSELoss(), (X, y))
    H = HessianOperator(problem, mode=mode)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    H @ v
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(X), y).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"parameter '0.weight' of Sequential was modified in"):
        H @ v
    with pytest.raises(ValueError, match="build a new CurvatureProblem"):
        problem.loss()
    with pytest.raises(ValueError, match="modified in place"):
        HessianOperator(problem.with_params("3.*"), mode=mode) @ torch.ones(5).double()
    fresh = CurvatureProblem(model, nn.MSELoss(), (X, y))  # a new problem reads them again
    assert torch.isfinite(HessianOperator(fresh, mode=mode) @ v).all()


def test_reduction_must_agree_with_the_loss_module():
    model, X, y = _bn_regression()
    with pytest.raises(ValueError, match="reduction='sum' but the problem was given reduction='me"):
        CurvatureProblem(model, nn.MSELoss(reduction="sum"), (X, y))
    with pytest.raises(ValueError, match="reduction='mean' but .* given reduction='sum'"):
        CurvatureProblem(model, nn.MSELoss(), (X, y), reduction="sum")
    CurvatureProblem(model, nn.MSELoss(reduction="sum"), (X, y), reduction="sum")
    CurvatureProblem(model, lambda o, t: ((o - t) ** 2).sum(), (X, y), reduction="sum")


@pytest.mark.parametrize("batchnorm", ["eval", "batch"])
def test_every_algorithm_leaves_model_and_rng_untouched(batchnorm, device):
    from nncurv.linalg import diagonal, eigenvalues, ggn_diagonal, spectral_density, trace

    model, loss_fn, (X, y) = case("bn_cnn_eval_mse_mean").make(device)
    model.train()
    loss_fn(model(X), y).backward()  # a .grad the analysis must not touch
    before = _snapshot(model)
    problem = CurvatureProblem(model, loss_fn, (X, y), batchnorm=batchnorm)
    H, G = HessianOperator(problem), GGNOperator(problem)
    eigenvalues(H, 2, which="BE", tol=1e-2)
    trace(H, 8)
    diagonal(H, 8)
    spectral_density(H, num_steps=8)
    eigenvalues(G, 1, method="power", max_matvecs=20)
    if batchnorm == "eval":  # (per-sample outputs need running statistics)
        ggn_diagonal(problem, method="mc")
    _assert_same(before, model)


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func transforms refuse it."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_auto_with_many_batches_names_the_mode_that_works():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _OldStyleSquare.apply(self.lin(x))

    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    batches = [(X[i : i + 2], y[i : i + 2]) for i in range(0, 20, 2)]  # 10 > 8 batches
    net = Net()
    problem = CurvatureProblem(net, nn.MSELoss(), batches)
    for Op in (HessianOperator, GGNOperator):
        with pytest.raises(RuntimeError, match="pass it, or a larger max_cached_batches"):
            Op(problem)
    H = HessianOperator(problem, mode="cached").to_dense()

    def loss(flat: torch.Tensor) -> torch.Tensor:  # the same loss written out, all samples
        return nn.functional.mse_loss((X @ flat[:3] + flat[3]).unsqueeze(1) ** 2, y)

    flat0 = torch.cat([net.lin.weight.detach().reshape(-1), net.lin.bias.detach()])
    ref = torch.autograd.functional.hessian(loss, flat0)
    assert torch.allclose(H, ref, rtol=1e-10, atol=1e-12)
