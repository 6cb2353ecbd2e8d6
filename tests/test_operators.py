"""Hessian and GGN operators against independent dense references (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nncurv import (
    CurvatureProblem,
    DictBatch,
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    hessian,
)
from tests.conftest import assert_close
from tests.reference import dense_ggn, dense_hessian
from tests.zoo import CASE_IDS, CASES, case

HESSIAN_MODES = ["auto", "cached", "forward-over-reverse", "reverse-over-reverse"]
GGN_MODES = ["auto", "cached", "forward", "reverse"]


def _build(op_cls, problem, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return op_cls(problem, mode=mode)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_hessian_matmat_identity_equals_dense(c, mode, device):
    model, loss_fn, (X, y) = c.make(device)
    problem = CurvatureProblem(model, loss_fn, (X, y), **c.kwargs)
    ref = dense_hessian(model, loss_fn, X, y, problem)
    H = _build(HessianOperator, problem, mode)
    assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12, what=f"{c.name}/{mode}")
    v = torch.randn(H.shape[0], dtype=H.dtype, device=device)
    assert_close(H @ v, ref @ v, rtol=1e-10, atol=1e-12, what="matvec")


@pytest.mark.parametrize("mode", GGN_MODES)
@pytest.mark.parametrize("c", [c for c in CASES if c.ggn], ids=[c.name for c in CASES if c.ggn])
def test_ggn_matmat_identity_equals_dense(c, mode, device):
    model, loss_fn, (X, y) = c.make(device)
    problem = CurvatureProblem(model, loss_fn, (X, y), **c.kwargs)
    ref = dense_ggn(model, loss_fn, X, y, problem)
    G = _build(GGNOperator, problem, mode)
    dense = G.to_dense()
    assert_close(dense, ref, rtol=1e-10, atol=1e-12, what=f"{c.name}/{mode}")
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-10 * float(dense.abs().max())


def test_linear_regression_closed_form(device):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(50, 1, generator=g, dtype=torch.float64).to(device)
    model = nn.Linear(4, 1).double().to(device)
    Xa = torch.cat([X, torch.ones(50, 1, dtype=X.dtype, device=device)], dim=1)
    expected = 2 * Xa.T @ Xa / 50  # parameter order: weight (4), bias (1)
    for mode in HESSIAN_MODES:  # forward-over-reverse included: pytorch#123996 worked around
        H = HessianOperator(CurvatureProblem(model, nn.MSELoss(), (X, y)), mode=mode)
        assert_close(H.to_dense(), expected, rtol=1e-12, atol=1e-13, what=mode)
    G = GGNOperator(CurvatureProblem(model, nn.MSELoss(), (X, y)))
    assert_close(G.to_dense(), expected, rtol=1e-12, atol=1e-13, what="ggn")


def test_symmetry_and_matmat_consistency(device):
    model, loss_fn, (X, y) = case("mlp_gelu_ce_sum").make(device)
    H = HessianOperator(CurvatureProblem(model, loss_fn, (X, y), reduction="sum"))
    gen = torch.Generator(device=device).manual_seed(0)
    V = torch.randn(H.shape[0], 5, generator=gen, dtype=H.dtype, device=device)
    HV = H.matmat(V)
    cols = torch.stack([H.matvec(V[:, j]) for j in range(5)], dim=1)
    assert_close(HV, cols, rtol=1e-11, atol=1e-13, what="matmat vs matvec")
    vHw, wHv = V[:, 0] @ HV[:, 1], V[:, 1] @ HV[:, 0]
    assert abs(float(vHw - wHv)) <= 1e-11 * float(HV.abs().max())
    H.matmat_chunk_size = 2
    assert_close(H.matmat(V), HV, rtol=1e-11, atol=1e-13, what="chunked matmat")
    assert H.num_matvecs == 15


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataloader_with_short_last_batch_equals_concatenated(reduction, device):
    model, _, (X, y) = case("mlp_tanh_mse_mean").make(device)
    loss_fn = nn.MSELoss(reduction=reduction)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=5, shuffle=True
    )  # 12 samples: batches of 5, 5, 2
    full = HessianOperator(CurvatureProblem(model, loss_fn, (X, y), reduction=reduction))
    for mode in ["cached", "reverse-over-reverse"]:
        batched = HessianOperator(
            CurvatureProblem(model, loss_fn, loader, reduction=reduction), mode=mode
        )
        assert batched.problem.batch_sizes == [5, 5, 2]
        assert_close(batched.to_dense(), full.to_dense(), rtol=1e-10, atol=1e-12, what=mode)
    G = GGNOperator(CurvatureProblem(model, loss_fn, loader, reduction=reduction))
    G_full = GGNOperator(CurvatureProblem(model, loss_fn, (X, y), reduction=reduction))
    assert_close(G.to_dense(), G_full.to_dense(), rtol=1e-10, atol=1e-12, what="ggn loader")


def test_batchnorm_batch_statistics_match_finite_differences(device):
    model, loss_fn, (X, y) = case("bn_eval_ce_mean").make(device)
    model.train()
    running = {k: v.clone() for k, v in model.named_buffers()}
    problem = CurvatureProblem(model, loss_fn, (X, y), batchnorm="batch")
    gen = torch.Generator(device=device).manual_seed(1)
    v = torch.randn(problem.num_params, generator=gen, dtype=torch.float64, device=device)
    p0 = {n: t.clone() for n, t in problem.params.items()}

    def grad_at(eps: float) -> torch.Tensor:
        shifted = {n: p0[n] + eps * t for n, t in problem.unflatten(v).items()}
        with problem.evaluating():
            batch = next(problem.batches())
            return problem.flatten(torch.func.grad(lambda p: problem.batch_loss(p, batch))(shifted))

    h = 1e-5
    fd = (grad_at(h) - grad_at(-h)) / (2 * h)
    for mode in HESSIAN_MODES:
        Hv = _build(HessianOperator, problem, mode) @ v
        assert_close(Hv, fd, rtol=1e-6, atol=1e-8, what=f"BN batch stats {mode}")
    # batch statistics differ from running statistics: the eval-mode Hessian is another matrix
    Hv_eval = HessianOperator(CurvatureProblem(model, loss_fn, (X, y))) @ v
    assert float((Hv_eval - fd).norm()) > 1e-3 * float(fd.norm())
    for k, t in model.named_buffers():
        assert torch.equal(t, running[k]), f"buffer {k} changed"
    assert model.training and all(m.training for m in model.modules())


def test_dropout_on_is_a_fixed_deterministic_operator(device):
    model, loss_fn, (X, y) = case("dropout_off_ce_mean").make(device)
    on = CurvatureProblem(model, loss_fn, (X, y), dropout="on", seed=7)
    off = CurvatureProblem(model, loss_fn, (X, y))
    gen = torch.Generator(device=device).manual_seed(2)
    v = torch.randn(on.num_params, generator=gen, dtype=torch.float64, device=device)
    for mode in ["cached", "forward-over-reverse", "reverse-over-reverse"]:
        H = HessianOperator(on, mode=mode)
        a, b = H @ v, H @ v
        assert torch.equal(a, b), mode
        V = torch.stack([v, 2 * v], dim=1)
        assert_close(H.matmat(V)[:, 1], 2 * a, rtol=1e-10, atol=1e-12, what=f"vmap mask {mode}")
    H_off = HessianOperator(off) @ v
    assert float((HessianOperator(on) @ v - H_off).norm()) > 1e-6


def test_nll_ggn_equals_cross_entropy_ggn(device):
    model, _, (X, y) = case("mlp_relu_ce_mean").make(device)
    ce = GGNOperator(CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))).to_dense()
    nll_model = nn.Sequential(model, nn.LogSoftmax(dim=-1))
    nll = GGNOperator(CurvatureProblem(nll_model, nn.NLLLoss(), (X, y))).to_dense()
    assert_close(nll, ce, rtol=1e-10, atol=1e-12, what="NLL vs CE GGN")


def test_parameter_selection_and_blocks_are_diagonal_blocks(device):
    model, loss_fn, (X, y) = case("mlp_tanh_mse_sum").make(device)
    problem = CurvatureProblem(model, loss_fn, (X, y), reduction="sum")
    full = HessianOperator(problem).to_dense()
    offsets, start = {}, 0
    for n in problem.param_names:
        offsets[n] = (start, start + problem.shapes[n].numel())
        start = offsets[n][1]
    for layer, names in problem.blocks().items():
        sub = HessianOperator(problem.with_params(names)).to_dense()
        idx = torch.cat([torch.arange(*offsets[n]) for n in names]).to(device)
        assert_close(sub, full[idx][:, idx], rtol=1e-10, atol=1e-12, what=f"block {layer}")
    by_pattern = CurvatureProblem(model, loss_fn, (X, y), params="2.*", reduction="sum")
    by_module = CurvatureProblem(model, loss_fn, (X, y), params=model[2], reduction="sum")
    assert by_pattern.param_names == by_module.param_names == ["2.weight", "2.bias"]
    weights = CurvatureProblem(
        model, loss_fn, (X, y), params=lambda n, p: n.endswith("weight"), reduction="sum"
    )
    assert weights.param_names == ["0.weight", "2.weight"]


def test_dict_batches_huggingface_style(device):
    class KwModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, scale: torch.Tensor) -> dict:
            return {"logits": self.lin(input_ids) * scale}

    model = KwModel().double().to(device)
    X = torch.randn(8, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    scale = torch.full((8, 1), 2.0, dtype=torch.float64, device=device)
    batch = {"input_ids": X, "scale": scale, "labels": y}
    H = HessianOperator(
        CurvatureProblem(model, nn.CrossEntropyLoss(), batch, batch_format=DictBatch("labels"))
    )
    ref_model = nn.Sequential(model.lin)
    ref_loss = lambda out, target: nn.functional.cross_entropy(2 * out, target)  # noqa: E731
    ref = HessianOperator(CurvatureProblem(ref_model, ref_loss, (X, y)))
    assert_close(H.to_dense(), ref.to_dense(), rtol=1e-10, atol=1e-12, what="dict batch")


def test_to_scipy_interop():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, loss_fn, data = case("mlp_tanh_mse_sum").make("cpu")
    H = hessian(model, loss_fn, data, reduction="sum")
    dense = H.to_dense()
    top = scipy_linalg.eigsh(H.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    assert abs(top[0] - float(torch.linalg.eigvalsh(dense)[-1])) < 1e-8 * abs(top[0])
    # the transpose product is offered only where it is known (a symmetric operator)
    M = torch.tensor([[1.0, 0.0], [2.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64).numpy()
    assert H.to_scipy().rmatvec(dense[0].numpy()).tolist() == pytest.approx(
        (dense @ dense[0]).tolist(), rel=1e-10
    )
    general = MatrixOperator(M, symmetric=False).to_scipy()
    assert general.matvec(v).tolist() == [1.0, 2.0]
    with pytest.raises(NotImplementedError):
        general.rmatvec(v)


def test_attention_hessian_matches_finite_differences():
    # independent of any autodiff Hessian: central differences of the gradient in float64
    model, loss_fn, (X, y) = case("transformer_ce_mean").make("cpu")
    model.eval()
    problem = CurvatureProblem(model, loss_fn, (X, y))
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(4), dtype=X.dtype)

    def grad_at(eps: float) -> torch.Tensor:
        p = {
            n: (problem.params[n] + eps * t).requires_grad_()
            for n, t in problem.unflatten(v).items()
        }
        with problem.evaluating():
            loss = problem.batch_loss(p, next(problem.batches()))
            return problem.flatten(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))

    fd = (grad_at(1e-5) - grad_at(-1e-5)) / 2e-5
    for mode in HESSIAN_MODES[1:]:
        assert_close(
            _build(HessianOperator, problem, mode) @ v, fd, rtol=1e-6, atol=1e-9, what=mode
        )


def test_auto_falls_back_with_one_warning_when_a_mode_fails():
    class NoDoubleBackward(HessianOperator):
        def _prepare(self, batch, mode):
            if mode == "cached":
                raise NotImplementedError("double backward missing for op X")
            return super()._prepare(batch, mode)

    model, loss_fn, data = case("mlp_relu_ce_mean").make("cpu")
    problem = CurvatureProblem(model, loss_fn, data)
    ref = HessianOperator(problem, mode="cached").to_dense()
    H = NoDoubleBackward(problem)  # auto: cached, verified by the first real product
    assert H.mode == "cached" and not H.mode_errors
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    with pytest.warns(RuntimeWarning, match="cached .NotImplementedError: double backward"):
        Hv = H @ v
    assert_close(Hv, ref @ v, rtol=1e-10, atol=1e-12, what="first product after fallback")
    assert H.mode in ("forward-over-reverse", "reverse-over-reverse")
    assert "cached" in H.mode_errors
    assert H.num_matvecs == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure is not reported twice
        NoDoubleBackward(problem) @ v
    assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12, what="fallback")


def test_auto_spends_no_product_on_a_probe():
    model, loss_fn, data = case("mlp_relu_ce_mean").make("cpu")
    calls = {"n": 0}

    def counting_loss(out, target):
        calls["n"] += 1
        return loss_fn(out, target)

    problem = CurvatureProblem(model, counting_loss, data)
    before = calls["n"]
    H = HessianOperator(problem)
    assert calls["n"] == before  # construction evaluates nothing
    v = torch.ones(H.shape[0], dtype=H.dtype)
    H @ v
    H @ v
    assert calls["n"] == before + 1  # one graph, reused by the second product


def test_gradient_from_cached_graph_equals_problem_gradient(device):
    model, loss_fn, (X, y) = case("mlp_relu_ce_mean").make(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)
    problem = CurvatureProblem(model, loss_fn, loader)
    _, ref = problem.loss_and_gradient()
    for mode in ["cached", "reverse-over-reverse"]:
        H = HessianOperator(problem, mode=mode)
        assert_close(H.gradient(), ref, rtol=1e-12, atol=1e-14, what=mode)
    X.requires_grad_(False)
    g_full = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (X,)), y))(
        dict(model.named_parameters())
    )
    assert_close(ref, problem.flatten(g_full), rtol=1e-12, atol=1e-14, what="vs torch.func.grad")


def test_cached_vmapped_backward_equals_column_loop():
    # the batched backward is what accelerators use; on CPU mm loops over columns
    model, loss_fn, data = case("cnn_ce_mean").make("cpu")
    H = HessianOperator(CurvatureProblem(model, loss_fn, data), mode="cached")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=H.dtype)
    loop = H.matmat(V)
    (prod,) = H._cache.values()
    assert prod.batched is None  # (three columns: not measured; the CPU default loops)
    prod.batched = True
    assert_close(prod.mm_flat(V), loop, rtol=1e-10, atol=1e-12, what="batched vs loop")
    cols = [H @ V[:, j] for j in range(3)]
    assert_close(torch.stack(cols, 1), loop, rtol=0, atol=0, what="matvec vs matmat loop")


@pytest.mark.parametrize("batched", [None, True, False])
def test_cached_matmat_strategies_equal_dense(batched, device):
    """Every ``batched_products`` setting gives the dense Hessian; ``None`` measures on the
    first wide matmat (one column looped, the rest batched) and keeps the faster."""
    model, loss_fn, (X, y) = case("mlp_tanh_mse_mean").make(device)
    problem = CurvatureProblem(model, loss_fn, (X, y))
    H = HessianOperator(problem, batched_products=batched)
    assert H.batched_products is batched
    ref = dense_hessian(model, loss_fn, X, y, problem)
    V = torch.randn(H.shape[0], 6, generator=torch.Generator().manual_seed(1), dtype=H.dtype)
    V = V.to(device)
    assert_close(H.matmat(V), ref @ V, rtol=1e-9, atol=1e-11, what=f"batched={batched}")
    assert H.num_matvecs == 6
    if batched is None:
        assert H.batched_products in (True, False)  # measured and kept
        (prod,) = H._cache.values()
        assert prod.batched is H.batched_products
    assert_close(H.matmat(V[:, :2]), ref @ V[:, :2], rtol=1e-9, atol=1e-11, what="again")


def test_batched_products_must_be_a_bool_or_none():
    model, loss_fn, data = case("mlp_tanh_mse_mean").make("cpu")
    with pytest.raises(TypeError, match="batched_products"):
        HessianOperator(CurvatureProblem(model, loss_fn, data), batched_products="yes")


def test_cached_matmat_measurement_with_batches_and_earlier_graphs():
    """Graphs built by earlier products (undecided) and several batches: the measured strategy
    reaches every batch's graph and the result stays exact; a failure leaves it undecided."""
    from nncurv.operators.hessian import _Cached

    model, loss_fn, (X, y) = case("mlp_tanh_mse_mean").make("cpu")
    loader = [(X[:5], y[:5]), (X[5:9], y[5:9]), (X[9:], y[9:])]
    problem = CurvatureProblem(model, loss_fn, loader)
    ref = dense_hessian(model, loss_fn, X, y, CurvatureProblem(model, loss_fn, (X, y)))
    H = HessianOperator(problem)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=H.dtype)
    assert_close(H @ v, ref @ v, rtol=1e-9, atol=1e-11, what="matvec")
    assert len(H._cache) == 3 and H.batched_products is None
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(3), dtype=H.dtype)
    assert_close(H.matmat(V), ref @ V, rtol=1e-9, atol=1e-11, what="measured matmat")
    assert H.batched_products in (True, False)
    assert {p.batched for p in H._cache.values()} == {H.batched_products}

    H2 = HessianOperator(problem, mode="cached")
    H2 @ v

    def broken(self, V):  # noqa: ANN001, ANN202
        raise ValueError("boom")

    orig = _Cached.mm_flat
    _Cached.mm_flat = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(ValueError, match="boom"):
            H2.matmat(V)
    finally:
        _Cached.mm_flat = orig  # type: ignore[method-assign]
    assert H2.batched_products is None
    assert {p.batched for p in H2._cache.values()} == {None}
    assert_close(H2.matmat(V), ref @ V, rtol=1e-9, atol=1e-11, what="after the failure")


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(4))  # never reached by the forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("batched", [True, False])
def test_cached_products_with_unused_parameters_and_constant_gradient(batched, device):
    """The cached (flat) product gives zero rows for a parameter the loss never reaches, and
    zero for a loss linear in the parameters, whose gradient does not depend on them."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64).to(device)
    model = _WithUnused().double().to(device)
    V = torch.randn(12, 5, generator=g, dtype=torch.float64).to(device)

    mse = CurvatureProblem(model, nn.MSELoss(), (X, y))
    H = HessianOperator(mse, mode="cached", batched_products=batched)
    ref = dense_hessian(model, nn.MSELoss(), X, y, mse)
    # (a module's own parameters come first: `unused` is 0:4)
    assert ref[:4].abs().max() == 0 and ref[4:, 4:].abs().max() > 0
    assert_close(H.matmat(V), ref @ V, rtol=1e-10, atol=1e-12, what="MSE with an unused parameter")
    assert_close(H @ V[:, 0], ref @ V[:, 0], rtol=1e-10, atol=1e-12, what="matvec")

    def linear_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out * target).mean()

    lin = CurvatureProblem(model, linear_loss, (X, y))
    H0 = HessianOperator(lin, mode="cached", batched_products=batched)
    assert torch.equal(H0.matmat(V), torch.zeros_like(V))
    assert torch.equal(H0 @ V[:, 0], torch.zeros_like(V[:, 0]))
    assert_close(H0.gradient(), lin.loss_and_gradient()[1], rtol=1e-12, atol=0, what="gradient")

    # inputs that require grad: the gradient then requires grad without depending on the
    # parameters; two batches share one flat copy of the parameters
    Xg = X.clone().requires_grad_(True)
    two = CurvatureProblem(model, linear_loss, [(Xg[:3], y[:3]), (Xg[3:], y[3:])])
    H1 = HessianOperator(two, mode="cached", batched_products=batched)
    assert torch.equal(H1.matmat(V), torch.zeros_like(V))
    assert torch.equal(H1 @ V[:, 0], torch.zeros_like(V[:, 0]))
    leaves = {id(p.leaf) for p in H1._cache.values()}
    assert len(H1._cache) == 2 and len(leaves) == 1
    H1.release()
    assert H1._leaf is None and not H1._cache
