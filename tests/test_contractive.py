"""Contractive penalties against closed forms and independently built dense Jacobians."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian as autograd_jacobian

from nncurv.contractive import (
    ContractiveLoss,
    batch_products_are_per_sample,
    contractive_penalty,
    higher_order_penalty,
    sigmoid_closed_form,
)
from nncurv.jacobians import jacobian_frobenius_sq
from tests.conftest import assert_close

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[1]


def _sigmoid_encoder(d_in: int = 7, d_h: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(d_in, d_h), nn.Sigmoid()).to(DT)
    with torch.no_grad():  # mixed-sign weights, so that (sum W)^2 != sum W^2
        enc[0].weight.mul_(3.0)
    return enc


def _dense_penalty(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of ||J||_F^2 from autograd.functional.jacobian, one sample at a time (no torch.func)."""
    terms = []
    for xi in x:
        J = autograd_jacobian(lambda z: encoder(z[None])[0], xi, create_graph=True)
        terms.append(J.square().sum())
    return torch.stack(terms).mean()


def _grads(value: torch.Tensor, encoder: nn.Module) -> list[torch.Tensor]:
    params = [p for p in encoder.parameters() if p.requires_grad]
    return list(torch.autograd.grad(value, params, allow_unused=True))


def _closed_form_by_hand(enc: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    W, b = enc[0].weight, enc[0].bias
    h = torch.sigmoid(x @ W.T + b)
    return ((h * (1 - h)) ** 2 * (W**2).sum(1)).sum(1)


# ----------------------------------------------------------------------------- closed form
def test_closed_form_equals_exact_and_hand_formula(device: torch.device) -> None:
    enc = _sigmoid_encoder().to(device)
    x = torch.randn(16, 7, dtype=DT, device=device)
    closed = contractive_penalty(enc, x, method="closed_form", reduction="none")
    exact = contractive_penalty(enc, x, method="exact", reduction="none")
    assert closed.device == x.device
    assert_close(closed, exact, rtol=1e-10, what="closed form vs exact")
    assert_close(closed, _closed_form_by_hand(enc, x), rtol=1e-12, what="closed form vs hand")
    assert_close(contractive_penalty(enc, x), exact.mean(), rtol=1e-10, what="auto (mean)")


def test_closed_form_with_flatten_on_images() -> None:
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Sigmoid()).to(DT)
    x = torch.randn(6, 3, 4, dtype=DT)
    closed = contractive_penalty(enc, x, method="closed_form", reduction="sum")
    exact = contractive_penalty(enc, x, method="exact", reduction="sum")
    assert_close(closed, exact, rtol=1e-10)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Softplus])
def test_closed_form_is_refused_for_other_activations(act: type[nn.Module]) -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(5, 3), act()).to(DT)
    x = torch.randn(4, 5, dtype=DT)
    with pytest.raises(ValueError, match=rf"Sequential\(Linear, {act.__name__}\).*sigmoid"):
        contractive_penalty(enc, x, method="closed_form")
    # "auto" falls back to the exact penalty, which matches an independent dense Jacobian
    assert_close(contractive_penalty(enc, x), _dense_penalty(enc, x), rtol=1e-10)


def test_relu_encoder_penalty_is_sum_of_active_row_norms() -> None:
    # the known bug: applying the sigmoid formula h(1-h) to a ReLU encoder
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU()).to(DT)
    x = torch.randn(10, 6, dtype=DT)
    W = enc[0].weight
    active = (enc[0](x) > 0).to(DT)
    expected = active @ W.square().sum(1)
    got = contractive_penalty(enc, x, reduction="none")
    assert_close(got, expected, rtol=1e-12, what="ReLU penalty")
    h = enc(x)
    wrong = (h * (1 - h)) ** 2 @ W.square().sum(1)  # sigmoid formula on ReLU units
    assert (wrong - expected).abs().max() > 1e-2 * expected.abs().max()


def test_guard_square_before_summing_weights() -> None:
    enc = _sigmoid_encoder()
    x = torch.randn(8, 7, dtype=DT)
    W, b = enc[0].weight, enc[0].bias
    h = torch.sigmoid(x @ W.T + b)
    summed_then_squared = ((h * (1 - h)) ** 2 * W.sum(1) ** 2).sum(1)  # pylearn2 PR #142
    ours = sigmoid_closed_form(enc, x)
    assert_close(ours, contractive_penalty(enc, x, method="exact", reduction="none"), rtol=1e-10)
    assert (ours - summed_then_squared).abs().min() > 1e-3 * ours.abs().min()


def test_guard_ones_cotangent_is_not_the_frobenius_norm() -> None:
    # autograd.grad(h, x, ones) returns 1^T J (column sums), not J
    enc = _sigmoid_encoder()
    x = torch.randn(8, 7, dtype=DT, requires_grad=True)
    (col_sums,) = torch.autograd.grad(enc(x), x, torch.ones(8, 4, dtype=DT))
    wrong = col_sums.square().sum(1)
    ours = contractive_penalty(enc, x.detach(), method="exact", reduction="none")
    assert_close(ours, _closed_form_by_hand(enc, x.detach()), rtol=1e-10)
    assert (ours - wrong).abs().min() > 1e-3 * ours.abs().min()


def test_guard_penalty_is_squared_norm_not_norm() -> None:
    lin = nn.Linear(5, 3).to(DT)  # constant Jacobian W
    x = torch.randn(4, 5, dtype=DT)
    assert_close(contractive_penalty(lin, x), lin.weight.square().sum(), rtol=1e-12)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    ("method", "d_in", "d_h"),
    [("closed_form", 7, 4), ("exact", 7, 4), ("exact", 3, 9)],  # jacrev and jacfwd sides
)
def test_penalty_gradient_reaches_weights_and_matches_dense(
    method: str, d_in: int, d_h: int
) -> None:
    enc = _sigmoid_encoder(d_in, d_h)
    x = torch.randn(5, d_in, dtype=DT)
    got = _grads(contractive_penalty(enc, x, method=method), enc)  # type: ignore[arg-type]
    ref = _grads(_dense_penalty(enc, x), enc)
    for g, r, name in zip(got, ref, ["weight", "bias"]):
        assert g is not None and float(g.abs().max()) > 0, f"no gradient reaches the {name}"
        assert_close(g, r, rtol=1e-9, atol=1e-13, what=f"d penalty / d {name} ({method})")


def test_detached_weights_bug_would_be_caught() -> None:
    # avijit9/Contractive_Autoencoder_in_Pytorch: W taken from state_dict(), detached
    enc = _sigmoid_encoder()
    x = torch.randn(5, 7, dtype=DT)
    W, b = enc[0].weight, enc[0].bias
    h = torch.sigmoid(x @ W.T + b)
    buggy = ((h * (1 - h)) ** 2 * (W.detach() ** 2).sum(1)).sum(1).mean()
    g_buggy = torch.autograd.grad(buggy, W)[0]
    g_ours = torch.autograd.grad(contractive_penalty(enc, x), W)[0]
    g_ref = _grads(_dense_penalty(enc, x), enc)[0]
    assert_close(g_ours, g_ref, rtol=1e-9)
    assert (g_buggy - g_ref).abs().max() > 1e-2 * g_ref.abs().max()


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_stochastic_penalty_and_gradient_are_unbiased(method: str) -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus()).to(DT)
    x = torch.randn(3, 6, dtype=DT)
    params = list(enc.parameters())
    exact = _dense_penalty(enc, x)
    g_exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, params)])
    gen = torch.Generator().manual_seed(11)
    probes = 1 if method == "hutchinson" else 3
    vals, grads = [], []
    for _ in range(400):
        p = contractive_penalty(enc, x, method=method, num_probes=probes, generator=gen)  # type: ignore[arg-type]
        vals.append(p.detach())
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(p, params)]))
    V, G = torch.stack(vals), torch.stack(grads)
    z_val = (V.mean() - exact.detach()).abs() / (V.std() / math.sqrt(len(V)))
    assert float(z_val) < 4.0
    se = G.std(0) / math.sqrt(G.shape[0])
    z = (G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, float(z.max())
    # power: a 25 % bias of the gradient would be caught
    assert float(((0.75 * G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)).max()) > 5.0


def test_hutchinson_mean_converges_to_closed_form_with_honest_errors() -> None:
    enc = _sigmoid_encoder(20, 10)
    x = torch.randn(8, 20, dtype=DT)
    closed = sigmoid_closed_form(enc, x)
    r = jacobian_frobenius_sq(enc, x, method="hutchinson", num_probes=20000, seed=3)
    z = (r.value - closed).abs() / r.std_error
    assert float(z.max()) < 4.0
    assert float((r.value / closed - 1).abs().max()) < 0.05  # and it did converge
    zm = (r.mean - closed.mean()).abs() / r.mean_std_error
    assert float(zm) < 4.0


# ----------------------------------------------------------------------------- CAE+H
def _higher_order_reference(enc: nn.Module, x: torch.Tensor, sigma: float, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((c, *x.shape), generator=gen, dtype=x.dtype)
    out = []
    for b in range(x.shape[0]):
        J0 = autograd_jacobian(lambda z: enc(z[None])[0], x[b], create_graph=True)
        terms = []
        for i in range(c):
            Ji = autograd_jacobian(
                lambda z: enc(z[None])[0], x[b] + sigma * noise[i, b], create_graph=True
            )
            terms.append((J0 - Ji).square().sum())
        out.append(torch.stack(terms).mean())
    return torch.stack(out), noise


def test_higher_order_exact_matches_reference_value_and_gradient() -> None:
    enc = _sigmoid_encoder(5, 3)
    x = torch.randn(4, 5, dtype=DT)
    ref, _ = _higher_order_reference(enc, x, 0.3, 3, seed=7)
    got = higher_order_penalty(enc, x, sigma=0.3, num_corruptions=3, seed=7, reduction="none")
    assert_close(got, ref, rtol=1e-10, what="CAE+H term")
    for g, r in zip(_grads(got.mean(), enc), _grads(ref.mean(), enc)):
        assert_close(g, r, rtol=1e-9, atol=1e-13, what="CAE+H gradient")


@pytest.mark.parametrize("side", ["input", "output"])
def test_higher_order_hutchinson_is_unbiased_given_the_corruptions(side: str) -> None:
    enc = _sigmoid_encoder(6, 4)
    x = torch.randn(3, 6, dtype=DT)
    sigma, c, k = 0.5, 2, 4000
    exact = higher_order_penalty(enc, x, sigma=sigma, num_corruptions=c, seed=5, reduction="none")
    est = higher_order_penalty(
        enc,
        x,
        sigma=sigma,
        num_corruptions=c,
        seed=5,
        method="hutchinson",
        num_probes=k,
        side=side,
        reduction="none",  # type: ignore[arg-type]
    )
    # the same seed gives the same corruptions: the estimate converges to the exact term;
    # tolerance from the Rademacher variance of the corruption-averaged estimator
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        eps = sigma * torch.randn((c, *x.shape), generator=gen, dtype=DT)
        Js = [
            [
                autograd_jacobian(lambda z: enc(z[None])[0], x[b] + e[b])
                for e in torch.cat([torch.zeros_like(eps[:1]), eps])
            ]
            for b in range(3)
        ]
        var = []
        for b in range(3):
            Ds = [Js[b][i + 1] - Js[b][0] for i in range(c)]
            A = sum((D.T @ D if side == "input" else D @ D.T) for D in Ds) / c
            # variance of one probe of v^T A v (Rademacher) with A the averaged matrix
            var.append(2 * (A.square().sum() - A.diagonal().square().sum()))
        se = (torch.stack(var) / k).sqrt()
    assert bool(((est - exact).abs() <= 4 * se + 1e-12).all()), (est - exact) / se


def test_higher_order_penalty_shrinks_with_sigma_like_a_hessian_norm() -> None:
    enc = _sigmoid_encoder(5, 3)
    x = torch.randn(4, 5, dtype=DT)
    a = higher_order_penalty(enc, x, sigma=1e-2, num_corruptions=50)
    b = higher_order_penalty(enc, x, sigma=1e-3, num_corruptions=50)
    assert 0.8 < float(a / b) / 100 < 1.25  # ~ sigma^2 ||Hessian||^2


# ----------------------------------------------------------------------- loss module
def test_contractive_loss_module() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(10, 6), nn.Tanh()).to(DT)
    x = torch.randn(4, 10, dtype=DT)
    crit = ContractiveLoss(0.3, method="hutchinson", num_probes=2)
    rng = torch.get_rng_state()
    a, b = crit(enc, x), crit(enc, x)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    assert not torch.equal(a, b)  # its own generator advances: fresh probes each step
    crit2 = ContractiveLoss(0.3, method="hutchinson", num_probes=2)
    assert torch.equal(crit2(enc, x), a)  # reproducible from the seed
    exact = ContractiveLoss(0.3, method="exact", higher_order_weight=0.1, num_corruptions=2)
    expected = 0.3 * contractive_penalty(enc, x) + 0.1 * higher_order_penalty(
        enc, x, num_corruptions=2, seed=0
    )
    assert_close(exact(enc, x), expected, rtol=1e-12)
    assert "weight=0.3" in repr(crit)
    with pytest.raises(ValueError, match="non-negative"):
        ContractiveLoss(-1.0)
    with pytest.raises(ValueError, match="reduction"):
        ContractiveLoss(reduction="none")  # type: ignore[arg-type]


def test_graph_only_when_needed_and_state_untouched() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.3), nn.Sigmoid())
    enc.train()
    enc(torch.randn(8, 6)).sum().backward()
    x = torch.randn(4, 6)
    snap = {k: v.clone() for k, v in enc.state_dict().items()}
    grads = [p.grad.clone() for p in enc.parameters()]
    rng = torch.get_rng_state()
    p = contractive_penalty(enc, x, method="hutchinson", num_probes=2)
    assert p.requires_grad
    with torch.no_grad():
        assert not contractive_penalty(enc, x).requires_grad
    assert all(m.training for m in enc.modules())
    assert all(torch.equal(v, snap[k]) for k, v in enc.state_dict().items())
    assert all(torch.equal(p_.grad, g) for p_, g in zip(enc.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "closed"}, ValueError, "method must be"),
        ({"reduction": "avg"}, ValueError, "reduction must be"),
        ({"num_probes": 0, "method": "hutchinson"}, ValueError, "num_probes"),
        ({"method": "hutch++", "num_probes": 1}, ValueError, "hutch"),
        ({"generator": 3, "method": "hutchinson"}, TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    enc = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    with pytest.raises(exc, match=match):
        contractive_penalty(enc, torch.randn(2, 3), **kwargs)


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.empty(0, 3), ValueError, "empty batch"),
    ],
)
@pytest.mark.parametrize("method", ["closed_form", "exact", "hutchinson"])
def test_bad_inputs(x: torch.Tensor, exc: type, match: str, method: str) -> None:
    enc = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid())
    with pytest.raises(exc, match=match):
        contractive_penalty(enc, x, method=method)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        higher_order_penalty(enc, x)


def test_closed_form_shape_mismatch() -> None:
    enc = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid())
    with pytest.raises(ValueError, match="features"):
        sigmoid_closed_form(enc, torch.randn(2, 4))
    with pytest.raises(ValueError, match="Flatten"):
        sigmoid_closed_form(enc, torch.randn(2, 1, 3))


# ----------------------------------------------------------------------------- example
@pytest.mark.slow
def test_example_runs_in_quick_mode(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "contractive_autoencoder.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probe accuracy" in proc.stdout
    assert (tmp_path / "contractive_autoencoder.png").stat().st_size > 10_000


# ------------------------------------------------------------------ batched autograd path
@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutch++"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_batched_products_equal_vmap_products(method: str, side: str) -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    enc.train()  # BatchNorm is evaluated with its running statistics either way
    x = torch.randn(7, 6, dtype=DT)
    kw = {"method": method, "num_probes": 6, "side": side, "seed": 3, "reduction": "none"}
    a = contractive_penalty(enc, x, **kw)  # type: ignore[arg-type]
    b = contractive_penalty(enc, x, vectorize="batch", **kw)  # type: ignore[arg-type]
    assert_close(b, a, rtol=1e-12, what=f"batched vs vmap ({method}, {side})")
    for g, r in zip(_grads(b.sum(), enc), _grads(a.sum(), enc)):
        if r is not None:
            assert_close(g, r, rtol=1e-10, atol=1e-14, what="gradient")
    with torch.no_grad():
        assert not contractive_penalty(enc, x, vectorize="batch", **kw).requires_grad  # type: ignore[arg-type]


class _MixesSamples(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x - x.mean(0, keepdim=True))


def test_contractive_loss_checks_that_batching_is_exact() -> None:
    x = torch.randn(6, 5, dtype=DT)
    enc = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).to(DT)
    assert batch_products_are_per_sample(enc, x)
    assert not batch_products_are_per_sample(_MixesSamples(), x)
    crit = ContractiveLoss(method="hutchinson", num_probes=3)
    crit(enc, x)
    assert crit._checked[id(enc)] == "batch"
    mixer = _MixesSamples()
    with pytest.warns(UserWarning, match="mixes samples"):
        got = crit(mixer, x)
    assert crit._checked[id(mixer)] == "vmap"
    # the per-sample (vmap) value: each sample alone gives x - x = 0, a constant output
    assert float(got) == 0.0


def test_closed_form_reuses_hidden_units() -> None:
    enc = _sigmoid_encoder()
    x = torch.randn(8, 7, dtype=DT)
    h = enc(x)
    a = contractive_penalty(enc, x, hidden=h)
    b = contractive_penalty(enc, x)
    assert_close(a, b, rtol=1e-14)
    for g, r in zip(_grads(a, enc), _grads(b, enc)):
        assert_close(g, r, rtol=1e-12)
    with pytest.raises(ValueError, match="hidden must be"):
        contractive_penalty(enc, x, hidden=h[:, :2])
    crit = ContractiveLoss(0.5)
    assert_close(crit(enc, x, h), 0.5 * b, rtol=1e-14)


def test_auto_method_choice() -> None:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(10, 8), nn.Tanh()).to(DT)
    x = torch.randn(3, 10, dtype=DT)
    assert_close(contractive_penalty(small, x), _dense_penalty(small, x), rtol=1e-10)
    big = nn.Sequential(nn.Linear(80, 70), nn.Tanh()).to(DT)  # min(d_in, d_out) > 64
    xb = torch.randn(3, 80, dtype=DT)
    auto = contractive_penalty(big, xb, num_probes=2, seed=4)
    hutch = contractive_penalty(big, xb, method="hutchinson", num_probes=2, seed=4)
    assert torch.equal(auto, hutch)


def test_batch_reduction_is_explicit() -> None:
    # the Theano-tutorial mistake: dividing by the batch size and then taking another mean
    enc = _sigmoid_encoder()
    x = torch.randn(8, 7, dtype=DT)
    none = contractive_penalty(enc, x, reduction="none")
    assert none.shape == (8,)
    assert_close(contractive_penalty(enc, x), none.mean(), rtol=1e-14)
    assert_close(contractive_penalty(enc, x, reduction="sum"), none.sum(), rtol=1e-14)
    assert_close(contractive_penalty(enc, x), _dense_penalty(enc, x), rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contractive_loss_fast_path_equals_checked_closed_form(reduction):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid()).double()
    x = torch.rand(6, 5, dtype=torch.float64)
    crit = ContractiveLoss(0.3, method="closed_form", reduction=reduction)
    ref = 0.3 * contractive_penalty(enc, x, method="exact", reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref, enc[0].weight)
    for _ in range(3):  # the first call is checked, later ones take the fast path
        h = enc(x)
        value = crit(enc, x, hidden=h)
        (g,) = torch.autograd.grad(value, enc[0].weight)
        torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
    assert crit._closed_form[id(enc)][1] is enc[0]
    relu = nn.Sequential(nn.Linear(5, 4), nn.ReLU()).double()
    strict = ContractiveLoss(0.3, method="closed_form")
    for _ in range(2):  # the refusal is not bypassed by the cache
        with pytest.raises(ValueError, match="sigmoid"):
            strict(relu, x, hidden=relu(x))


# ------------------------------------------------------- fused closed form and fast paths
def _plain_sigmoid_sum(h: torch.Tensor, W: torch.Tensor, scale: float) -> torch.Tensor:
    return ((h * (1 - h)) ** 2 * (W**2).sum(1)).sum() * scale


def test_fused_closed_form_value_gradient_and_double_backward() -> None:
    from nncurv.contractive import _sigmoid_penalty_sum

    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 4, dtype=DT, generator=g).requires_grad_(True)
    W = (3 * torch.randn(4, 5, dtype=DT, generator=g)).requires_grad_(True)
    fused = _sigmoid_penalty_sum(h, W, 0.7)
    plain = _plain_sigmoid_sum(h, W, 0.7)
    assert fused.grad_fn is not None and "SigmoidPenaltySum" in type(fused.grad_fn).__name__
    assert_close(fused, plain, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (h, W)), torch.autograd.grad(plain, (h, W))):
        assert_close(a, b, rtol=1e-10, atol=1e-14)
    # double backward: the full Hessian in (h, W) equals that of the plain expression
    hes_f = torch.autograd.functional.hessian(lambda a, b: _sigmoid_penalty_sum(a, b, 0.7), (h, W))
    hes_p = torch.autograd.functional.hessian(lambda a, b: _plain_sigmoid_sum(a, b, 0.7), (h, W))
    for row_f, row_p in zip(hes_f, hes_p):
        for a, b in zip(row_f, row_p):
            assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert float(hes_p[0][1].abs().max()) > 1e-3  # the mixed block is not trivially zero
    assert torch.autograd.gradgradcheck(lambda a, b: _sigmoid_penalty_sum(a, b, 0.7), (h, W))
    # only one input requiring a gradient
    (gw,) = torch.autograd.grad(_sigmoid_penalty_sum(h.detach(), W, 0.7), W)
    (gw_ref,) = torch.autograd.grad(_plain_sigmoid_sum(h.detach(), W, 0.7), W)
    assert_close(gw, gw_ref, rtol=1e-10)
    # under torch.func transforms the plain expression is used (old-style Functions refuse them)
    gf = torch.func.grad(lambda a: _sigmoid_penalty_sum(a, W.detach(), 0.7))(h.detach())
    gp = torch.func.grad(lambda a: _plain_sigmoid_sum(a, W.detach(), 0.7))(h.detach())
    assert_close(gf, gp, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contractive_loss_closed_form_fast_path_without_hidden(reduction: str) -> None:
    enc = _sigmoid_encoder()
    x = torch.randn(8, 7, dtype=DT)
    crit = ContractiveLoss(0.3, method="closed_form", reduction=reduction)  # type: ignore[arg-type]
    ref = 0.3 * contractive_penalty(enc, x, method="exact", reduction=reduction)  # type: ignore[arg-type]
    g_ref = _grads(ref, enc)
    for _ in range(3):  # checked first call, then the fused fast path
        value = crit(enc, x)
        assert_close(value, ref, rtol=1e-10)
        for a, b in zip(_grads(value, enc), g_ref):
            assert_close(a, b, rtol=1e-10, atol=1e-14)
    h, pen = crit.encode(enc, x)
    assert_close(h, enc(x), rtol=0, atol=0)
    assert_close(pen, ref, rtol=1e-10)


def _hutch_encoder(d_in: int, d_out: int) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out), nn.Softplus()).to(DT)


@pytest.mark.parametrize(("d_in", "d_out", "side"), [(6, 4, "output"), (3, 6, "input")])
def test_hutchinson_fast_path_is_the_general_estimate(d_in: int, d_out: int, side: str) -> None:
    enc = _hutch_encoder(d_in, d_out)
    x = torch.randn(5, d_in, dtype=DT)
    fast = ContractiveLoss(0.3, method="hutchinson", seed=7)
    general = ContractiveLoss(0.3, method="hutchinson", seed=7, vectorize="vmap")
    for i in range(4):  # the first call is checked and learns the probe side
        a = fast(enc, x) if i % 2 else fast.encode(enc, x)[1]
        b = general(enc, x)
        assert_close(a, b, rtol=1e-12)
        for ga, gb in zip(_grads(a, enc), _grads(b, enc)):
            assert_close(ga, gb, rtol=1e-10, atol=1e-14)
    assert fast._hutch_side[id(enc)][2] == side
    assert general._hutch_side == {}  # vmap: no fast path
    # encode: the hidden units are encoder(x), with the encoder's graph for the training loss
    h, pen = fast.encode(enc, x)
    assert_close(h, enc(x), rtol=1e-14)
    loss = h.square().sum() + pen
    ref = enc(x).square().sum() + general(enc, x)
    for ga, gb in zip(_grads(loss, enc), _grads(ref, enc)):
        assert_close(ga, gb, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 4), (3, 6)])
def test_hutchinson_fast_path_is_unbiased_in_value_and_gradient(d_in: int, d_out: int) -> None:
    enc = _hutch_encoder(d_in, d_out)
    x = torch.randn(3, d_in, dtype=DT)
    params = list(enc.parameters())
    exact = _dense_penalty(enc, x)
    g_exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, params)])
    crit = ContractiveLoss(method="hutchinson", seed=5)
    vals, grads = [], []
    for _ in range(400):
        p = crit.encode(enc, x)[1]
        vals.append(p.detach())
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(p, params)]))
    assert crit._hutch_side[id(enc)][2] is not None  # all but the first call took the fast path
    V, G = torch.stack(vals), torch.stack(grads)
    assert float((V.mean() - exact.detach()).abs() / (V.std() / math.sqrt(len(V)))) < 4.0
    se = G.std(0) / math.sqrt(G.shape[0])
    assert float(((G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)).max()) < 5.0
    assert float(((0.75 * G.mean(0) - g_exact).abs() / se.clamp_min(1e-12)).max()) > 5.0


def test_hutchinson_fast_path_only_where_a_direct_call_is_the_analysis_call() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=DT)
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Tanh()).to(DT)  # train mode
    crit = ContractiveLoss(method="hutchinson", seed=3)
    ref = ContractiveLoss(method="hutchinson", seed=3, vectorize="vmap")
    for _ in range(2):  # dropout stays off in the penalty: no fast path for this encoder
        assert_close(crit(drop, x), ref(drop, x), rtol=1e-12)
    assert crit._hutch_side[id(drop)][2] is None
    assert drop.training and drop[1].training
    enc = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).to(DT)
    crit(enc, x)
    with torch.no_grad():  # no graph wanted: general path, a constant
        assert not crit(enc, x).requires_grad
    enc.requires_grad_(False)
    assert not crit(enc, x).requires_grad
