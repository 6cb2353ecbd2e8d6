"""Loss-landscape slices: closed forms, Taylor error order, filter normalisation, invariance, BN."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nncurv import CurvatureProblem
from nncurv.landscape import (
    Direction,
    LandscapeSlice,
    accuracy,
    eigenvector_directions,
    filter_normalize,
    gradient_direction,
    interpolation_direction,
    plot_slice,
    plot_slices,
    random_direction,
    slice_1d,
    slice_2d,
    slices_to_tensorboard,
    user_direction,
)

DT = torch.float64


def _regression(device: torch.device, n: int = 40, d: int = 5, at_minimum: bool = True):
    """Linear least squares: L(w) = mean((Xw - y)^2) is exactly quadratic, H = 2 XᵀX / N."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, d, dtype=DT)
    y = X @ torch.randn(d, 1, generator=g, dtype=DT) + 0.3 * torch.randn(
        n, 1, generator=g, dtype=DT
    )
    model = nn.Linear(d, 1, bias=False).to(device=device, dtype=DT)
    if at_minimum:
        w = torch.linalg.lstsq(X, y).solution
        with torch.no_grad():
            model.weight.copy_(w.T)
    X, y = X.to(device), y.to(device)
    H = 2 * X.T @ X / n
    return model, (X, y), H


def _mlp(
    device: torch.device, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device=device, dtype=DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(30, 4, generator=g, dtype=DT).to(device)
    y = torch.randint(0, 3, (30,), generator=g).to(device)
    return model, (X, y)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.bn1 = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(h.flatten(1)))


def _bn_setup(device: torch.device):
    torch.manual_seed(3)
    model = BNNet().to(device=device, dtype=DT)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(48, 1, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (48,), generator=g)
    model.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for i in range(0, 48, 16):
            model(X[i : i + 16].to(device))
    loader = [(X[i : i + 16].to(device), y[i : i + 16].to(device)) for i in range(0, 48, 16)]
    return model, loader


# ---------------------------------------------------------------------------------- closed forms
def test_quadratic_slices_along_eigenvectors_are_half_lambda_t_squared(device):
    model, data, H = _regression(device)
    problem = CurvatureProblem(model, nn.MSELoss(), data)
    dirs = eigenvector_directions(problem, k=3, tol=1e-12)
    exact = torch.linalg.eigvalsh(H.cpu()).flip(0)[:3]
    t = np.linspace(-2.0, 2.0, 41)
    for i, d in enumerate(dirs):
        lam = d.info.eigenvalue
        assert lam is not None and math.isclose(lam, float(exact[i]), rel_tol=1e-10)
        assert math.isclose(d.info.norm, 1.0, rel_tol=1e-12)
        s = slice_1d(problem, d, steps=t)
        # at the least-squares minimum g = 0, so the slice is exactly ½λt²
        np.testing.assert_allclose(s.loss - s.center_loss, 0.5 * lam * t**2, rtol=1e-9, atol=1e-12)
        tm = s.taylor
        assert tm is not None
        np.testing.assert_allclose(tm.predicted, s.loss, rtol=1e-11, atol=1e-13)
        assert math.isclose(tm.curvature, lam, rel_tol=1e-10)
        assert abs(tm.slope) < 1e-10
        assert tm.valid_range == (t[0], t[-1])  # exact everywhere
        assert abs(tm.best_step) <= t[1] - t[0]


def test_quadratic_taylor_exact_away_from_minimum_and_cauchy_step(device):
    model, data, H = _regression(device, at_minimum=False)
    problem = CurvatureProblem(model, nn.MSELoss(), data)
    _, g = problem.loss_and_gradient()
    eps_star = float(g @ g / (g @ H @ g))
    # unnormalised -g: the slice coordinate is a learning rate
    d = gradient_direction(problem, normalize=False)
    steps = np.linspace(0.0, 2.5 * eps_star, 501)
    s = slice_1d(problem, d, steps=steps)
    tm = s.taylor
    assert tm is not None and tm.epsilon_star is not None and tm.best_learning_rate is not None
    np.testing.assert_allclose(tm.predicted, s.loss, rtol=1e-10)
    assert math.isclose(tm.epsilon_star, eps_star, rel_tol=1e-10)
    # on a quadratic the exact line minimum along -g is the Cauchy step ε*
    assert abs(tm.best_learning_rate - eps_star) <= steps[1] - steps[0]
    assert math.isclose(tm.quadratic_step, eps_star, rel_tol=1e-10)
    # unit-norm gradient: same ε* in learning-rate units
    du = gradient_direction(problem)
    su = slice_1d(problem, du, steps=np.linspace(0, 2.5 * eps_star * float(g.norm()), 301))
    assert su.taylor is not None and su.taylor.epsilon_star is not None
    assert math.isclose(su.taylor.epsilon_star, eps_star, rel_tol=1e-10)
    assert math.isclose(du.info.norm, 1.0, rel_tol=1e-12)


def test_taylor_error_falls_like_t_cubed_on_a_network(device):
    model, data = _mlp(device)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = random_direction(problem, seed=5)
    h = np.array([0.08, 0.04, 0.02, 0.01, 0.005])
    s = slice_1d(problem, d, steps=np.concatenate([-h, h]))
    tm = s.taylor
    assert tm is not None
    err = tm.abs_error[len(h) :]
    orders = np.log2(err[:-1] / err[1:])  # error(h) / error(h/2) = 2^3 for a cubic remainder
    assert np.all(np.abs(orders - 3.0) < 0.25), orders
    # the second-order model beats the first-order one near 0
    first = tm.value + tm.slope * h
    assert np.all(err < np.abs(first - s.loss[len(h) :]))


# ----------------------------------------------------------------------------- directions
def test_filter_normalisation_matches_filter_norms():
    torch.manual_seed(0)
    conv, lin, bn = nn.Conv2d(3, 5, 3), nn.Linear(7, 4), nn.BatchNorm1d(4)
    params = {
        "c.weight": conv.weight.detach().double(),
        "c.bias": conv.bias.detach().double(),
        "l.weight": lin.weight.detach().double(),
        "bn.weight": bn.weight.detach().double() * 1.7,
    }
    g = torch.Generator().manual_seed(1)
    raw = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    out = filter_normalize(raw, params)
    for n in ("c.weight", "l.weight"):
        p, d = params[n], out[n]
        pn = p.reshape(p.shape[0], -1).norm(dim=1)
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, pn, rtol=1e-12, atol=0)
        # only rescaled: every filter keeps its direction
        cos = (d * raw[n]).reshape(d.shape[0], -1).sum(1) / (
            dn * raw[n].reshape(d.shape[0], -1).norm(dim=1)
        )
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-12, atol=1e-12)
    assert out["c.bias"].abs().sum() == 0 and out["bn.weight"].abs().sum() == 0
    kept = filter_normalize(raw, params, ignore_1d=False)
    assert math.isclose(float(kept["c.bias"].norm()), float(params["c.bias"].norm()), rel_tol=1e-12)
    layer = filter_normalize(raw, params, normalization="layer")
    assert math.isclose(
        float(layer["c.weight"].norm()), float(params["c.weight"].norm()), rel_tol=1e-12
    )
    model_n = filter_normalize(raw, params, normalization="model")
    tot = math.sqrt(sum(float(model_n[n].norm()) ** 2 for n in model_n))
    ref = math.sqrt(sum(float(params[n].norm()) ** 2 for n in ("c.weight", "l.weight")))
    assert math.isclose(tot, ref, rel_tol=1e-12)
    assert torch.equal(raw["c.weight"], raw["c.weight"].clone())  # input untouched (no in-place)
    with pytest.raises(ValueError, match="normalization"):
        filter_normalize(raw, params, normalization="batch")  # type: ignore[arg-type]


def test_random_direction_is_seeded_and_on_device(device):
    model, data = _mlp(device)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    a, b, c = (random_direction(problem, seed=s) for s in (1, 1, 2))
    for n in problem.param_names:
        assert a.vector[n].device.type == device.type and a.vector[n].dtype == DT
        assert torch.equal(a.vector[n], b.vector[n])
    assert not torch.equal(a.vector["0.weight"], c.vector["0.weight"])
    w = problem.params["0.weight"]
    torch.testing.assert_close(a.vector["0.weight"].norm(dim=1), w.norm(dim=1))


def test_interpolation_reaches_the_other_parameters_and_user_direction(device):
    model, data = _mlp(device, seed=0)
    other, _ = _mlp(device, seed=7)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = interpolation_direction(problem, other)
    s = slice_1d(problem, d, steps=[0.0, 0.5, 1.0], taylor=False)
    ref_b = nn.functional.cross_entropy(other(data[0]), data[1]).item()
    ref_a = nn.functional.cross_entropy(model(data[0]), data[1]).item()
    assert math.isclose(s.loss[2], ref_b, rel_tol=1e-12)
    assert math.isclose(s.loss[0], ref_a, rel_tol=1e-12)
    # the same line given as a user direction (state dict of differences)
    diff = {n: (p - model.state_dict()[n]) for n, p in other.state_dict().items()}
    u = user_direction(problem, diff, label="diff")
    su = slice_1d(problem, u, steps=[0.0, 0.5, 1.0], taylor=False)
    np.testing.assert_allclose(su.loss, s.loss, rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        user_direction(problem, {**diff, "0.weight": torch.zeros(2, 2, dtype=DT)})


# ----------------------------------------------------------------------------- evaluation
def test_2d_grid_matches_direct_evaluation_on_a_loader_with_sum_reduction(device):
    model, (X, y) = _mlp(device)
    loader = [(X[:13], y[:13]), (X[13:], y[13:])]  # unequal batches
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    problem = CurvatureProblem(model, loss_fn, loader, reduction="sum")
    dx, dy = random_direction(problem, seed=1), random_direction(problem, seed=2)
    s = slice_2d(
        problem,
        dx,
        dy,
        steps=(4, 3),
        span=((-0.5, 1.0), (-1.0, 1.0)),
        metrics={"acc": accuracy},
        chunk_size=5,
        vectorize=True,
    )
    assert s.loss.shape == (4, 3) and s.vectorized
    for i, a in enumerate(s.axes[0]):
        for j, b in enumerate(s.axes[1]):
            p = {n: problem.params[n] + a * dx.vector[n] + b * dy.vector[n] for n in problem.params}
            out = torch.func.functional_call(model, p, (X,))
            ref = loss_fn(out, y)
            assert math.isclose(s.loss[i, j], float(ref), rel_tol=1e-12)
            assert math.isclose(s.metrics["acc"][i, j], float(accuracy(out, y)), rel_tol=1e-12)
    loop = slice_2d(problem, dx, dy, steps=(4, 3), span=((-0.5, 1.0), (-1.0, 1.0)), vectorize=False)
    assert not loop.vectorized
    np.testing.assert_allclose(loop.loss, s.loss, rtol=1e-12)
    assert math.isclose(s.center_loss, float(problem.loss()), rel_tol=1e-12)


def test_nonfinite_values_are_reported():
    model, data = _mlp(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = user_direction(problem, {n: torch.full_like(p, 1e308) for n, p in problem.params.items()})
    s = slice_1d(problem, d, steps=[0.0, 1.0], taylor=False)
    assert s.num_nonfinite == 1 and not s.finite and np.isfinite(s.loss[0])


# ----------------------------------------------------------------------------- invariance
def _snapshot(model: nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: m.training for n, m in model.named_modules()},
        torch.get_rng_state(),
    )


def _assert_same(before, after) -> None:
    for a, b in zip(before[:3], after[:3]):
        assert a.keys() == b.keys()
        for k in a:
            if a[k] is None:
                assert b[k] is None, k
            else:
                assert torch.equal(a[k], b[k]), k
    assert before[3] == after[3]
    assert torch.equal(before[4], after[4])


def test_model_grad_buffers_modes_and_rng_are_untouched(device):
    model, loader = _bn_setup(device)
    model.train()
    model.bn.eval()  # mixed flags must survive too
    out = model(loader[0][0])
    nn.functional.cross_entropy(out, loader[0][1]).backward()
    torch.manual_seed(123)
    before = _snapshot(model)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), loader)
    d1, d2 = random_direction(problem, seed=1), random_direction(problem, seed=2)
    eig = eigenvector_directions(problem, k=1, tol=1e-6)[0]
    gd = gradient_direction(problem)
    slice_1d(problem, eig, steps=5, metrics={"acc": accuracy}, recalibrate_bn=True)
    slice_1d(problem, gd, steps=5)
    slice_2d(problem, d1, d2, steps=3, vectorize=True, recalibrate_bn=True)
    slice_2d(problem, d1, d2, steps=3, vectorize=False, recalibrate_bn=True)
    interpolation_direction(problem, copy.deepcopy(model))
    _assert_same(before, _snapshot(model))


# ----------------------------------------------------------------------------- BatchNorm
def _reference_losses(model, loader, points, recalibrate: bool) -> list[float]:
    """The loss-landscapes way: copy the model, load each point's parameters, evaluate."""
    from torch.optim.swa_utils import update_bn

    N = sum(len(y) for _, y in loader)
    out = []
    for p in points:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, t in m.named_parameters():
                t.copy_(p[n])
        if recalibrate:
            update_bn([x for x, _ in loader], m)  # equal batch sizes: same as weighting by size
        m.eval()
        with torch.no_grad():
            out.append(
                sum(float(nn.functional.cross_entropy(m(x), y)) * len(y) / N for x, y in loader)
            )
    return out


@pytest.mark.parametrize("recalibrate", [False, True], ids=["running-stats", "recalibrated"])
def test_batchnorm_with_and_without_recalibration(device, recalibrate):
    model, loader = _bn_setup(device)
    model.eval()
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), loader)
    d = random_direction(problem, seed=9)
    t = [-0.6, 0.0, 0.4, 1.0]
    s = slice_1d(
        problem, d, steps=t, taylor=False, recalibrate_bn=recalibrate, chunk_size=3, vectorize=True
    )
    points = [{n: problem.params[n] + ti * d.vector[n] for n in problem.params} for ti in t]
    ref = _reference_losses(model, loader, points, recalibrate)
    np.testing.assert_allclose(s.loss, ref, rtol=1e-10)
    assert s.recalibrated_bn is recalibrate and s.vectorized
    loop = slice_1d(problem, d, steps=t, taylor=False, recalibrate_bn=recalibrate, vectorize=False)
    np.testing.assert_allclose(loop.loss, s.loss, rtol=1e-12)
    if recalibrate:  # recalibration changes the values at θ too (stale running stats)
        other = slice_1d(problem, d, steps=t, taylor=False)
        assert np.abs(other.loss - s.loss).max() > 1e-6


def test_recalibration_needs_eval_batchnorm():
    model, loader = _bn_setup(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), loader, batchnorm="batch")
    with pytest.raises(ValueError, match="batchnorm='eval'"):
        slice_1d(problem, random_direction(problem), recalibrate_bn=True)


# ----------------------------------------------------------------------------- results I/O
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model, data = _mlp(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = gradient_direction(problem)
    s1 = slice_1d(problem, d, steps=7, span=(-0.5, 1.0), metrics={"acc": accuracy})
    s2 = slice_2d(problem, d, random_direction(problem), steps=(3, 4))
    for s in (s1, s2):
        path = s.save(tmp_path / f"s{s.ndim}{suffix}")
        back = LandscapeSlice.load(path)
        assert back.directions == s.directions
        for a, b in zip(back.axes, s.axes):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(back.loss, s.loss)
        assert back.metrics.keys() == s.metrics.keys()
        assert back.center_loss == s.center_loss and back.wall_time == s.wall_time
        if s.taylor is not None:
            assert back.taylor is not None
            np.testing.assert_array_equal(back.taylor.predicted, s.taylor.predicted)
            assert back.taylor.epsilon_star == s.taylor.epsilon_star
            assert back.taylor.valid_range == s.taylor.valid_range
    json.loads((tmp_path / "s1.json").read_text()) if suffix == ".json" else None
    with pytest.raises(ValueError, match="npz or .json"):
        s1.save(tmp_path / "x.txt")


# ----------------------------------------------------------------------------- plots
def test_plots_and_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, data = _mlp(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d1, d2 = random_direction(problem, seed=1), random_direction(problem, seed=2)
    s1 = slice_1d(problem, d1, steps=11)
    s2 = slice_2d(problem, d1, d2, steps=5)
    fig = plot_slice(s1)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "loss" in labels and "2nd-order Taylor" in labels
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_ydata(), s1.loss)
    assert len(plot_slice(s2).axes) == 2  # contour + colour bar
    assert plot_slice(s2, kind="surface").axes[0].name == "3d"
    assert len(plot_slices([s1, s2]).axes) == 3
    with pytest.raises(ValueError, match="does not fit"):
        plot_slice(s1, kind="contour")
    tags = slices_to_tensorboard({"line": s1, "plane": s2}, tmp_path / "tb", surface=True)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert (
        sorted(acc.Tags()["images"])
        == sorted(tags)
        == sorted(["landscape/line", "landscape/plane", "landscape/plane_surface"])
    )
    img = acc.Images("landscape/line")[0]
    assert img.width > 100 and img.height > 100


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_before_work():
    model, data = _mlp(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = random_direction(problem)
    with pytest.raises(TypeError, match="CurvatureProblem"):
        slice_1d(model, d)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Direction"):
        slice_1d(problem, d.vector)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        slice_1d(problem, d, steps=1)
    with pytest.raises(ValueError, match="span"):
        slice_1d(problem, d, span=(1.0, -1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        slice_1d(problem, d, chunk_size=0)
    with pytest.raises(ValueError, match="vectorize"):
        slice_1d(problem, d, vectorize="yes")
    with pytest.raises(TypeError, match="not callable"):
        slice_1d(problem, d, metrics={"acc": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="normalization"):
        random_direction(problem, normalization="unit")  # type: ignore[arg-type]
    sub = problem.with_params("0.*")
    with pytest.raises(ValueError, match="does not match"):
        slice_1d(sub, d)
    with pytest.raises(TypeError, match="other"):
        interpolation_direction(problem, 3)
    bad = Direction({n: t for n, t in d.vector.items() if n != "0.bias"}, d.info)
    with pytest.raises(ValueError, match="does not match"):
        slice_2d(problem, d, bad)
    wrong = Direction({**d.vector, "0.bias": torch.zeros(2, dtype=DT)}, d.info)
    with pytest.raises(ValueError, match="has shape"):
        slice_1d(problem, wrong)
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(ValueError, match="taylor_rtol must be positive, got 0"):
            slice_1d(problem, d, taylor_rtol=0)
    finally:
        hook.remove()
    assert forwards == []  # refused before the grid was evaluated


# ---------------------------------------------------------------- first-layer affine precomputation
def _affine_model(kind: str, bias: bool, device: torch.device):
    """Sequential models whose first layer takes the raw input, with float64 data."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    if kind == "mlp":  # nested: the first child is itself a Sequential
        model = nn.Sequential(
            nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh()),
            nn.Linear(7, 6),
            nn.Softplus(),
            nn.Linear(6, 3),
        )
        X = torch.randn(24, 5, generator=g, dtype=DT)
    elif kind == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1, bias=bias),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6, 3),
        )
        X = torch.randn(24, 2, 6, generator=g, dtype=DT)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1, padding_mode="reflect", bias=bias),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 3),
        )
        X = torch.randn(24, 1, 5, 5, generator=g, dtype=DT)
    for m in model.modules():  # non-trivial running statistics (used with batchnorm="eval")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return model.to(device=device, dtype=DT), (X.to(device), y.to(device))


def _both_paths(problem, dirs, C, **kw):
    from nncurv._landscape_eval import evaluate_points

    vecs = [d.vector for d in dirs]
    fast = evaluate_points(problem, problem.params, vecs, C, **kw)
    slow = evaluate_points(problem, problem.params, vecs, C, precompute_first_layer=False, **kw)
    return fast, slow


@pytest.mark.parametrize("kind", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_first_layer_precomputation_matches_generic_path(device, kind, bias, k):
    model, data = _affine_model(kind, bias, device)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    dirs = [random_direction(problem, seed=s) for s in range(1, k + 1)]
    C = torch.randn(13, k, generator=torch.Generator().manual_seed(5), dtype=DT).to(device)
    fast, slow = _both_paths(problem, dirs, C, metrics={"acc": accuracy}, chunk_size=4)
    assert fast.first_layer_precomputed and not slow.first_layer_precomputed
    assert fast.vectorized and slow.vectorized
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fast.metrics["acc"], slow.metrics["acc"], rtol=0, atol=0)
    # also against an independent reference: a model copy with the point's parameters loaded
    ref = copy.deepcopy(model).eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for i in (0, 7, 12):
            for n, p in ref.named_parameters():
                p.copy_(start[n] + sum(C[i, j] * dirs[j].vector[n] for j in range(k)))
            want = nn.functional.cross_entropy(ref(data[0]), data[1])
            torch.testing.assert_close(fast.loss[i], want, rtol=1e-12, atol=1e-13)
    # and through the public slices (which take the precomputation automatically)
    if k == 1:
        s = slice_1d(problem, dirs[0], steps=C[:, 0].cpu(), taylor=False)
    else:
        s = slice_2d(problem, dirs[0], dirs[1], coords=(C[:3, 0].cpu(), C[:4, 1].cpu()))
        a, b = np.meshgrid(C[:3, 0].cpu().numpy(), C[:4, 1].cpu().numpy(), indexing="ij")
        C = torch.as_tensor(np.stack([a.ravel(), b.ravel()], 1), device=device)
        slow = _both_paths(problem, dirs, C)[1]
    np.testing.assert_allclose(s.loss.ravel(), slow.loss.cpu().numpy(), rtol=1e-12, atol=1e-13)


def test_first_layer_precomputation_loop_loader_and_selection(device):
    """The point-by-point loop, a multi-batch loader (sum reduction), a selection without the
    first layer (its direction is zero) and one with its weight only."""
    model, (X, y) = _affine_model("mlp", True, device)
    loader = [(X[:10], y[:10]), (X[10:], y[10:])]
    C = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=DT).to(device)
    for params in (None, ["1.*", "3.*"], ["0.0.weight", "3.weight"]):
        problem = CurvatureProblem(
            model, nn.CrossEntropyLoss(reduction="sum"), loader, reduction="sum", params=params
        )
        dirs = [random_direction(problem, seed=s) for s in (1, 2)]
        for vectorize in (True, False):
            fast, slow = _both_paths(problem, dirs, C, vectorize=vectorize, chunk_size=4)
            assert fast.first_layer_precomputed, params
            assert fast.vectorized is vectorize
            torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x[:, :3]


class _Tied(nn.Module):
    """A Sequential-like chain that is not an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _fallback_cases():
    def hooked() -> nn.Module:
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        m[0].register_forward_hook(lambda mod, inp, out: out * 2)
        return m

    def tied() -> nn.Module:
        m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, 3))
        m[2].weight = m[0].weight
        return m

    bn = lambda: nn.Sequential(  # noqa: E731
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)
    )
    return {
        "not sequential": (_Tied, {}, {}),
        "residual first child": (lambda: nn.Sequential(_Residual(), nn.Tanh()), {}, {}),
        "non-affine first": (lambda: nn.Sequential(nn.Tanh(), nn.Linear(5, 3)), {}, {}),
        "hook": (hooked, {}, {}),
        "tied weights": (tied, {}, {}),
        "batchnorm batch": (bn, {"batchnorm": "batch"}, {}),
        "recalibrate": (bn, {}, {"recalibrate_bn": True}),
        "dropout on": (
            lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.3), nn.Linear(4, 3)),
            {"dropout": "on"},
            {},
        ),
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_first_layer_precomputation_falls_back(case):
    build, problem_kw, eval_kw = _fallback_cases()[case]
    torch.manual_seed(0)
    model = build().to(DT).train("dropout" in case)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y), **problem_kw)
    dirs = [random_direction(problem, seed=s) for s in (1, 2)]
    C = torch.randn(5, 2, generator=g, dtype=DT)
    fast, slow = _both_paths(problem, dirs, C, **eval_kw)
    assert not fast.first_layer_precomputed
    torch.testing.assert_close(fast.loss, slow.loss, rtol=0, atol=0)
    if case == "tied weights":  # the generic path keeps the tie: check against a model copy
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.add_(C[0, 0] * dirs[0].vector[n] + C[0, 1] * dirs[1].vector[n])
            torch.testing.assert_close(fast.loss[0], nn.functional.cross_entropy(ref(X), y))


def test_first_layer_precomputation_tuple_inputs_fall_back():
    """Inputs given as a tuple (``model(*inputs)``) take the generic path, same values."""
    model, (X, y) = _affine_model("mlp", True, torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), [((X,), y)])
    d = random_direction(problem, seed=1)
    C = torch.linspace(-1, 1, 5, dtype=DT)[:, None]
    fast, slow = _both_paths(problem, [d], C)
    assert not fast.first_layer_precomputed
    torch.testing.assert_close(fast.loss, slow.loss, rtol=0, atol=0)
    tensor_problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))
    on_tensor = _both_paths(tensor_problem, [d], C)[0]
    assert on_tensor.first_layer_precomputed
    torch.testing.assert_close(on_tensor.loss, fast.loss, rtol=1e-12, atol=1e-13)


def test_first_layer_precomputation_overflowing_direction_falls_back():
    """``L(x; D)`` overflows: ``0 · inf`` would make the centre NaN, so the generic path runs."""
    model, data = _mlp(torch.device("cpu"))
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), data)
    d = user_direction(problem, {n: torch.full_like(p, 1e308) for n, p in problem.params.items()})
    fast, slow = _both_paths(problem, [d], torch.tensor([[0.0], [1.0]], dtype=DT))
    assert not fast.first_layer_precomputed
    assert torch.isfinite(fast.loss[0]) and not torch.isfinite(fast.loss[1])
    torch.testing.assert_close(fast.loss, slow.loss, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fast_cross_entropy_equals_the_users_loss_and_falls_back(device, reduction):
    """The landscape's logsumexp cross-entropy equals ``F.cross_entropy`` where it applies, and
    defers to the user's loss (weights, label smoothing, ignored targets, soft targets)."""
    from nncurv._landscape_eval import fast_loss
    from nncurv.problem import Batch

    g = torch.Generator().manual_seed(3)
    out = (5 * torch.randn(3, 17, 6, generator=g, dtype=DT)).to(device)  # 3 points
    y = torch.randint(0, 6, (17,), generator=g).to(device)
    model = nn.Linear(2, 6).to(device=device, dtype=DT)

    def value(loss_fn, targets):
        problem = CurvatureProblem(
            model, loss_fn, (torch.zeros(17, 2, dtype=DT), targets), reduction=reduction
        )
        batch = Batch(inputs=None, targets=targets, size=17, weight=1.0, index=0)
        return fast_loss(problem, batch)

    plain = nn.CrossEntropyLoss(reduction=reduction)
    fast = value(plain, y)
    assert fast is not None
    got = torch.func.vmap(fast)(out)
    ref = torch.stack([plain(o, y) for o in out])
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    ignored = y.clone()
    ignored[0] = -100
    for loss_fn, targets in [
        (
            nn.CrossEntropyLoss(weight=torch.ones(6, dtype=DT, device=device), reduction=reduction),
            y,
        ),
        (nn.CrossEntropyLoss(label_smoothing=0.1, reduction=reduction), y),
        (nn.CrossEntropyLoss(reduction=reduction), ignored),
        (nn.CrossEntropyLoss(reduction=reduction), torch.softmax(out[0], 1)),
        (nn.MSELoss(reduction=reduction), out[0]),
    ]:
        assert value(loss_fn, targets) is None


@pytest.mark.parametrize("select", [None, "0.", "2."])
def test_batched_mlp_path_matches_generic_path(device, select):
    """After the precomputed first layer an MLP of nn.Linear and elementwise layers runs as
    batched products: equal to the vmapped functional_call path and to a model copy, with a
    loader and sum reduction, a parameter selection, layers without bias and metrics; other
    layers in the rest, or a metric that cannot be vmapped, take the other paths."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 4),
        nn.Tanh(), nn.Linear(4, 3),
    ).to(device=device, dtype=DT)  # fmt: skip
    X = torch.randn(23, 5, generator=g, dtype=DT).to(device)
    y = torch.randint(0, 3, (23,), generator=g).to(device)
    loader = [(X[:10], y[:10]), (X[10:], y[10:])]
    params = None if select is None else (lambda name, p: not name.startswith(select))
    problem = CurvatureProblem(
        model, nn.CrossEntropyLoss(reduction="sum"), loader, reduction="sum", params=params
    )
    dirs = [random_direction(problem, seed=s) for s in (1, 2)]
    C = torch.randn(11, 2, generator=torch.Generator().manual_seed(4), dtype=DT).to(device)
    fast, slow = _both_paths(problem, dirs, C, metrics={"acc": accuracy}, chunk_size=4)
    assert fast.batched_mlp  # also with the first layer unselected (fixed: still affine)
    assert fast.first_layer_precomputed and not slow.batched_mlp
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.metrics["acc"], slow.metrics["acc"], rtol=0, atol=0)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 10):
            for n, p in ref.named_parameters():
                if n in problem.params:
                    p.copy_(
                        problem.params[n]
                        + C[i, 0] * dirs[0].vector[n]
                        + C[i, 1] * dirs[1].vector[n]
                    )
            want = nn.functional.cross_entropy(ref(X), y, reduction="sum")
            torch.testing.assert_close(fast.loss[i], want, rtol=1e-12, atol=1e-12)

    def scalar_metric(out, t):  # .item() has no batching rule: the other path evaluates it
        return torch.tensor(float((out.argmax(1) == t).double().mean()), dtype=out.dtype)

    m, _ = _both_paths(problem, dirs, C[:3], metrics={"s": scalar_metric}, chunk_size=4)
    assert not m.batched_mlp
    torch.testing.assert_close(m.loss, slow.loss[:3], rtol=1e-12, atol=1e-12)

    norm = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).to(device, DT)
    p2 = CurvatureProblem(norm, nn.CrossEntropyLoss(), (X, y))
    d2 = [random_direction(p2, seed=1)]
    f2, s2 = _both_paths(p2, d2, C[:5, :1], chunk_size=4)
    assert f2.first_layer_precomputed and not f2.batched_mlp
    torch.testing.assert_close(f2.loss, s2.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.3, inplace=True), nn.SiLU(inplace=True)])
def test_inplace_modules_do_not_corrupt_the_first_layer_outputs(act):
    """An ``inplace=True`` module right after the precomputed first layer, with a metric that
    cannot be vmapped (so the chunk is evaluated again point by point): same values as the
    generic path."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 3)).to(dtype=DT)
    X = torch.randn(19, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (19,), generator=g)
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))
    dirs = [random_direction(problem, seed=1)]
    C = torch.randn(6, 1, generator=torch.Generator().manual_seed(2), dtype=DT)

    def scalar_metric(out, t):
        return torch.tensor(float((out.argmax(1) == t).double().mean()), dtype=out.dtype)

    for metrics in ({}, {"s": scalar_metric}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fast, slow = _both_paths(problem, dirs, C, metrics=metrics, chunk_size=2)
        torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-12, atol=1e-12)
