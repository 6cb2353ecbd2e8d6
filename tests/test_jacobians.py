"""Layer Jacobians, their products and norms against independent dense references (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from nncurv._jacobian_norms import spectral_lanczos, spectral_power
from nncurv._jacobian_operator import DenseBatchedJacobian
from nncurv.jacobians import (
    frobenius_from_operator,
    jacobian_frobenius_sq,
    layer_jacobian,
    layer_jvp,
    layer_vjp,
    linearization_error,
    singular_values,
    spectral_norm,
)
from tests.conftest import assert_close

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ problem zoo
class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def _cnn() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.GroupNorm(2, 4),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    bn = net[1]
    with torch.no_grad():  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net


# name -> (model factory, input shape, layer name, prefix callable producing the reference)
def _case(name: str) -> tuple[nn.Module, torch.Tensor, str | None, object]:
    torch.manual_seed(0)
    if name == "linear":
        m = nn.Linear(5, 3).to(DT)
        return m, torch.randn(4, 5, dtype=DT), None, lambda z: m(z[None])[0]
    if name == "mlp_hidden":
        m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
        return m, torch.randn(4, 5, dtype=DT), "1", lambda z: torch.tanh(m[0](z))
    if name in ("conv_bn_maxpool", "conv_groupnorm_avgpool", "cnn_out"):
        m = _cnn().to(DT).eval()
        x = torch.randn(3, 2, 8, 8, dtype=DT)
        upto = {"conv_bn_maxpool": 3, "conv_groupnorm_avgpool": 6, "cnn_out": 8}[name]
        return m, x, str(upto), lambda z: m[: upto + 1](z[None])[0]
    if name == "layernorm":
        m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)).to(DT)
        return m, torch.randn(3, 4, dtype=DT), "1", lambda z: m[1](m[0](z[None]))[0]
    if name == "attention":
        m = _Attention().to(DT).eval()

        def ref(z: torch.Tensor) -> torch.Tensor:
            h = nn.functional.layer_norm(z, (6,), m.norm.weight, m.norm.bias)
            q, k, v = (
                h @ w.T + b
                for w, b in zip(m.attn.in_proj_weight.chunk(3), m.attn.in_proj_bias.chunk(3))
            )
            heads = lambda t: t.reshape(t.shape[0], 2, 3).transpose(0, 1)  # noqa: E731
            a = torch.softmax(heads(q) @ heads(k).transpose(1, 2) / math.sqrt(3), dim=-1)
            o = (a @ heads(v)).transpose(0, 1).reshape(-1, 6)
            return m.attn.out_proj(o)

        return m, torch.randn(2, 4, 6, dtype=DT), "attn", ref
    raise KeyError(name)


CASES = [
    "linear",
    "mlp_hidden",
    "conv_bn_maxpool",
    "conv_groupnorm_avgpool",
    "cnn_out",
    "layernorm",
    "attention",
]


def _reference(fn: object, x: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobians, one plain ``jacrev`` per sample (no vmap, no hooks)."""
    with torch.no_grad():
        return torch.stack([jacrev(fn)(xi) for xi in x])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_layer_jacobian_matches_dense_reference(name: str, mode: str, device: torch.device) -> None:
    model, x, layer, ref_fn = _case(name)
    expected = _reference(ref_fn, x)
    model, x = model.to(device), x.to(device)
    J = layer_jacobian(model, x, layer=layer, mode=mode)  # type: ignore[arg-type]
    assert J.shape == expected.shape
    assert J.device == x.device and J.dtype == DT
    assert_close(J, expected, rtol=1e-10, atol=1e-12, what=f"{name} Jacobian ({mode})")


def test_layer_passed_as_module_and_wrt_layer_input() -> None:
    model, x, _, _ = _case("mlp_hidden")
    J = layer_jacobian(model, x, layer=model[2], wrt="layer_input")
    assert_close(J, model[2].weight.expand(4, -1, -1), rtol=1e-14, what="Linear layer Jacobian")
    # tanh layer w.r.t. its own input: diag(1 - tanh(z)^2)
    z = model[0](x)
    J = layer_jacobian(model, x, layer="1", wrt="layer_input")
    assert_close(J, torch.diag_embed(1 - torch.tanh(z) ** 2), rtol=1e-12, what="tanh Jacobian")


def test_self_attention_wrt_own_input_moves_query_key_value_together() -> None:
    model, x, _, _ = _case("attention")
    h = model.norm(x)

    def ref(z: torch.Tensor) -> torch.Tensor:
        return model.attn(z[None], z[None], z[None], need_weights=False)[0][0]

    expected = _reference(ref, h)
    J = layer_jacobian(model, x, layer="attn", wrt="layer_input")
    assert_close(J, expected, rtol=1e-10, atol=1e-12, what="attention Jacobian wrt own input")
    # holding key/value fixed would be a different (smaller) matrix: the test can tell them apart
    only_q = _reference(
        lambda z: model.attn(z[None], h[:1], h[:1], need_weights=False)[0][0], h[:1]
    )
    assert (only_q[0] - expected[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mlp_hidden", "conv_bn_maxpool", "attention"])
def test_jvp_and_vjp_match_dense(name: str) -> None:
    model, x, layer, ref_fn = _case(name)
    J = _reference(ref_fn, x)
    B = x.shape[0]
    out_shape, in_shape = J.shape[1 : J.ndim - x.ndim + 1], x.shape[1:]
    Jm = J.reshape(B, math.prod(out_shape), -1)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(x.shape, dtype=DT, generator=g)
    u = torch.randn((B, *out_shape), dtype=DT, generator=g)
    jv = layer_jvp(model, x, v, layer=layer)
    assert_close(jv.reshape(B, -1), (Jm @ v.reshape(B, -1, 1))[..., 0], rtol=1e-10, atol=1e-12)
    uj = layer_vjp(model, x, u, layer=layer)
    assert uj.shape == (B, *in_shape)
    assert_close(
        uj.reshape(B, -1),
        (Jm.transpose(1, 2) @ u.reshape(B, -1, 1))[..., 0],
        rtol=1e-10,
        atol=1e-12,
    )


# ------------------------------------------------------------------------------ Frobenius
def test_frobenius_exact_matches_dense(device: torch.device) -> None:
    model, x, layer, ref_fn = _case("conv_bn_maxpool")
    J = _reference(ref_fn, x)
    expected = J.reshape(J.shape[0], -1).square().sum(1)
    r = jacobian_frobenius_sq(model.to(device), x.to(device), layer=layer)
    assert_close(r.value, expected, rtol=1e-12, what="exact Frobenius")
    assert r.method == "exact" and r.num_products == 3 * 4 * 4 and r.wall_time >= 0
    assert bool((r.std_error == 0).all())


def _decaying_jacobians(B: int = 3, m: int = 12, n: int = 20, decay: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    Js = []
    for _ in range(B):
        U, _ = torch.linalg.qr(torch.randn(m, m, dtype=DT, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, m, dtype=DT, generator=g))
        s = decay ** torch.arange(m, dtype=DT)
        Js.append(U @ torch.diag(s) @ V.T)
    return torch.stack(Js)


def _rademacher_variance(A: torch.Tensor) -> torch.Tensor:
    """Var of one Rademacher probe of tr(A): 2 (||A||_F^2 - sum A_ii^2), per sample."""
    return 2 * (A.square().sum((1, 2)) - A.diagonal(dim1=1, dim2=2).square().sum(1))


@pytest.mark.parametrize("side", ["input", "output"])
def test_hutchinson_is_unbiased_with_honest_standard_errors(side: str) -> None:
    J = _decaying_jacobians(decay=0.8)
    B, k, reps = J.shape[0], 50, 400
    exact = J.square().sum((1, 2))
    # `reps` independent repetitions at once: probes are independent across the batch
    op = DenseBatchedJacobian(J.repeat(reps, 1, 1))
    r = frobenius_from_operator(op, method="hutchinson", num_probes=k, side=side, seed=0)  # type: ignore[arg-type]
    values, ses = r.value.reshape(reps, B), r.std_error.reshape(reps, B)
    A = J @ J.transpose(1, 2) if side == "output" else J.transpose(1, 2) @ J
    true_se = (_rademacher_variance(A) / k).sqrt()
    # mean within 4 standard errors of the mean
    assert bool(((values.mean(0) - exact).abs() <= 4 * true_se / math.sqrt(reps)).all())
    # reported standard errors are honest: their RMS matches the true one within 10 %
    assert_close(ses.square().mean(0).sqrt(), true_se, rtol=0.1, what="Hutchinson s.e.")
    # and so does the spread of the estimates
    assert_close(values.std(0), true_se, rtol=0.15, what="Hutchinson spread")
    assert r.num_products == k


def test_hutchpp_is_unbiased_and_beats_hutchinson_on_decaying_spectrum() -> None:
    J = _decaying_jacobians(decay=0.5)
    B, reps, budget = J.shape[0], 1000, 9
    exact = J.square().sum((1, 2))
    op = DenseBatchedJacobian(J.repeat(reps, 1, 1))
    pp_res = frobenius_from_operator(op, method="hutch++", num_probes=budget, seed=1)
    hu_res = frobenius_from_operator(op, method="hutchinson", num_probes=budget, seed=2)
    pp, hu = pp_res.value.reshape(reps, B), hu_res.value.reshape(reps, B)
    assert pp_res.num_products == budget == hu_res.num_products
    se_pp = pp.std(0) / math.sqrt(reps)
    assert bool(((pp.mean(0) - exact).abs() <= 4 * se_pp).all())
    # reported standard errors match the spread within 15 %
    assert_close(pp_res.std_error.reshape(reps, B).square().mean(0).sqrt(), pp.std(0), rtol=0.15)
    # variance reduction at the same number of products (target: >= 5x)
    ratio = hu.var(0) / pp.var(0)
    assert bool((ratio >= 5).all()), ratio


def test_hutchinson_gradient_is_unbiased() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    x = torch.randn(3, 6, dtype=DT)
    params = [model[0].weight, model[0].bias, model[2].weight]  # the last bias has no effect
    exact = jacobian_frobenius_sq(model, x).value.mean()
    g_exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, params)])
    gen = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(300):
        est = jacobian_frobenius_sq(model, x, method="hutchinson", num_probes=4, generator=gen)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(est.mean, params)]))
    G = torch.stack(grads)
    se = G.std(0) / math.sqrt(G.shape[0])
    z = (G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, float(z.max())  # ~80 coordinates: max |z| < 5 w.p. > 0.9999
    # and the test has power: a biased gradient (e.g. 0.9x) would be caught
    assert float(((0.9 * G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)).max()) > 5.0


def test_results_follow_grad_mode() -> None:
    model, x, layer, _ = _case("mlp_hidden")
    assert jacobian_frobenius_sq(model, x, layer=layer).value.requires_grad
    with torch.no_grad():
        assert not jacobian_frobenius_sq(model, x, layer=layer).value.requires_grad
    model.requires_grad_(False)
    assert not layer_jacobian(model, x, layer=layer).requires_grad


# ------------------------------------------------------------------------ spectrum, Taylor
def test_spectral_norm_power_and_exact_match_svd() -> None:
    model, x, layer, ref_fn = _case("conv_groupnorm_avgpool")
    J = _reference(ref_fn, x)
    s = torch.linalg.svdvals(J.reshape(J.shape[0], 4, -1))
    power = spectral_norm(model, x, layer=layer, method="power", tol=1e-12, max_iters=5000)
    assert_close(power.value, s[:, 0], rtol=1e-6, what="power iteration")
    assert bool(power.converged.all()) and power.num_iters > 0
    assert power.num_products == 2 * power.num_iters + 2
    lanczos = spectral_norm(model, x, layer=layer, method="lanczos", tol=1e-10)
    assert_close(lanczos.value, s[:, 0], rtol=1e-9, what="Lanczos")
    assert bool(lanczos.converged.all()) and bool((lanczos.residual <= 1e-10).all())
    exact = spectral_norm(model, x, layer=layer, method="exact")
    assert_close(exact.value, s[:, 0], rtol=1e-10, what="exact spectral norm")
    assert_close(singular_values(model, x, layer=layer), s, rtol=1e-10, atol=1e-14)
    assert not power.value.requires_grad


def test_lanczos_beats_power_iteration_on_close_singular_values() -> None:
    g = torch.Generator().manual_seed(0)
    B, m, n = 4, 30, 50
    U, _ = torch.linalg.qr(torch.randn(B, m, m, dtype=DT, generator=g))
    V, _ = torch.linalg.qr(torch.randn(B, n, m, dtype=DT, generator=g))
    s = torch.linspace(1.0, 0.1, m, dtype=DT).expand(B, -1).clone()
    s[:, 1] = 0.98  # sigma_2 / sigma_1 = 0.98: power iteration needs hundreds of steps
    J = U @ torch.diag_embed(s) @ V.transpose(1, 2)
    lz = spectral_lanczos(DenseBatchedJacobian(J), max_iters=200, tol=1e-10, generator=g)
    pw = spectral_power(DenseBatchedJacobian(J), max_iters=200, tol=1e-10, generator=g)
    assert_close(lz[0], s[:, 0], rtol=1e-9, what="Lanczos")
    assert bool(lz[2].all()) and lz[3] <= 30
    assert not bool(pw[2].all())  # power iteration has not converged after 200 steps
    pw30 = spectral_power(DenseBatchedJacobian(J), max_iters=30, tol=1e-10, generator=g)
    assert float((pw30[0] - 1).abs().max()) > 1e-4  # and is inaccurate at Lanczos' budget


def test_singular_values_refuses_large_layers() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        singular_values(nn.Linear(50, 40), torch.randn(3, 50), max_entries=1000)


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_linearization_error_falls_like_eps_squared() -> None:
    # g(x) = x*x: the Taylor error is exactly eps^2 ||d * d||, so error / eps^2 is constant
    x = torch.randn(4, 5, dtype=DT)
    r = linearization_error(_Square(), x)
    ratio = r.errors / r.epsilons[:, None] ** 2
    assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-6, what="error / eps^2")
    assert abs(r.order - 2) < 1e-6
    # a smooth conv/GroupNorm/tanh network in float64
    model, x, layer, _ = _case("conv_groupnorm_avgpool")
    assert 1.9 < linearization_error(model, x, layer=layer).order < 2.1


def test_linearization_error_detects_a_wrong_jacobian(monkeypatch: pytest.MonkeyPatch) -> None:
    import nncurv._jacobian_operator as core

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    right = core._FunctionalJacobian._matmat
    monkeypatch.setattr(core._FunctionalJacobian, "_matmat", lambda self, V: 1.01 * right(self, V))
    assert linearization_error(model, x).order < 1.2


# ---------------------------------------------------------------------------- bad input
def test_unknown_layer_lists_valid_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"unknown layer 'fc1'.*'0', '1', '2'"):
        layer_jacobian(model, torch.randn(2, 3), layer="fc1")
    with pytest.raises(ValueError, match="not a submodule"):
        layer_jacobian(model, torch.randn(2, 3), layer=nn.Linear(3, 4))
    with pytest.raises(TypeError, match="layer must be"):
        layer_jacobian(model, torch.randn(2, 3), layer=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (torch.ones(2, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(2, 3, dtype=torch.bool), TypeError, "floating-point"),
        (torch.empty(0, 3), ValueError, "empty batch"),
        (torch.tensor(1.0), ValueError, "batch dimension"),
        ([[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_refused(x: object, exc: type, match: str) -> None:
    model = nn.Linear(3, 2)
    for fn in (layer_jacobian, jacobian_frobenius_sq, spectral_norm, linearization_error):
        with pytest.raises(exc, match=match):
            fn(model, x)  # type: ignore[operator]


class _WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)  # registered but never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_other_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="v must have shape"):
        layer_jvp(model, x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="method must be"):
        jacobian_frobenius_sq(model, x, method="hutch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_probes"):
        jacobian_frobenius_sq(model, x, method="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="hutch\\+\\+ needs"):
        jacobian_frobenius_sq(model, x, method="hutch++", num_probes=2)
    with pytest.raises(ValueError, match="wrt must be"):
        layer_jacobian(model, x, wrt="weights")  # type: ignore[arg-type]
    unused = _WithSpare()
    with pytest.raises(ValueError, match="not called"):
        layer_jacobian(unused, x, layer="spare")
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        layer_jacobian(emb, torch.tensor([[1, 2]]))


# --------------------------------------------------------------------------- invariance
def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "flags": [(n, m.training) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict[str, object], model: nn.Module) -> None:
    after = _snapshot(model)
    assert after["flags"] == before["flags"]
    for k, v in before["state"].items():  # type: ignore[attr-defined]
        assert torch.equal(after["state"][k], v), k  # type: ignore[index]
    for a, b in zip(after["grads"], before["grads"]):  # type: ignore[call-overload]
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(after["rng"], before["rng"])  # type: ignore[arg-type]


def test_model_state_is_untouched_also_on_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)
    )
    model.train()
    model[4].eval()  # mixed flags must come back exactly
    model(torch.randn(8, 4)).sum().backward()  # non-empty .grad
    x, u, v = torch.randn(5, 4), torch.randn(5, 6), torch.randn(5, 7)
    before = _snapshot(model)
    layer_jacobian(model, x)
    jacobian_frobenius_sq(model, x, method="hutch++", num_probes=6)
    spectral_norm(model, x, method="power", max_iters=5)
    linearization_error(model, x, layer="3")
    layer_vjp(model, x, u, layer="1", wrt="layer_input")
    _assert_same(before, model)
    with pytest.raises(ValueError):
        layer_jvp(model, x, v)  # raises inside the analysis context
    _assert_same(before, model)
    assert not model._forward_hooks and not model[3]._forward_hooks
    assert not model[1]._forward_pre_hooks


def test_wrt_layer_input_products_and_linearization() -> None:
    model, x, _, _ = _case("mlp_hidden")
    z = model[0](x).detach()  # input of the tanh layer
    d = 1 - torch.tanh(z) ** 2
    v = torch.randn(z.shape, dtype=DT)
    assert_close(layer_jvp(model, x, v, layer="1", wrt="layer_input"), d * v, rtol=1e-12)
    assert_close(layer_vjp(model, x, v, layer="1", wrt="layer_input"), d * v, rtol=1e-12)
    assert 1.9 < linearization_error(model, x, layer="1", wrt="layer_input").order < 2.1
