"""Top eigenvalues of network Hessians: nncurv against PyHessian and hessian-eigenthings.

Problems: the benchmark MLP (21.7k parameters) and CNN (21.6k) of ``_common.py`` after a few
SGD steps, float32 operators as users run them. Truth: a long float64 Lanczos run on the same
model (tol 1e-10). Every method is measured against that truth, not against its own stopping
rule, side by side in one run:

* nncurv ``eigenvalues`` (Lanczos; default tol and tol=1e-2) and ``method="block"``;
* PyHessian ``hessian.eigenvalues`` (power iteration, rel. change < 1e-3, the real package when
  installed, else the same recipe written here);
* hessian-eigenthings 1.0 ``deflated_power_iteration`` (tol 1e-4) on the same HVP;
* warm start: after 3 more SGD steps, nncurv cold vs warm-started from the previous
  eigenvectors;
* BatchNorm in train mode: PyHessian forces ``model.eval()``, so it reports the eval-mode
  Hessian; nncurv with ``batchnorm="batch"`` uses batch statistics.

Run: ``.venv/bin/python benchmarks/eigen.py`` (about 2-3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, mlp, threads  # noqa: E402

from nncurv import CurvatureProblem, HessianOperator  # noqa: E402
from nncurv.linalg import eigenvalues  # noqa: E402

warnings.filterwarnings("ignore")


def sgd(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def truth(model: nn.Module, loss_fn: nn.Module, data: tuple, k: int, **kw: object) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    X, y = data
    X = X.double()
    H = HessianOperator(CurvatureProblem(m64, loss_fn, (X, y), **kw))  # type: ignore[arg-type]
    r = eigenvalues(H, k=k, tol=1e-10, ncv=40, max_matvecs=2000)
    assert r.converged
    return r.eigenvalues


def pyhessian_power(model: nn.Module, loss_fn: nn.Module, data: tuple, top_n: int):
    """PyHessian's power iteration; returns (eigenvalues, products, seconds)."""
    m = copy.deepcopy(model)
    try:
        import pyhessian  # noqa: F401

        ph = sys.modules["pyhessian.hessian"]

        count = {"n": 0}
        orig = ph.hessian_vector_product

        def counting(gradsH, params, v):  # noqa: ANN001, ANN202
            count["n"] += 1
            return orig(gradsH, params, v)

        ph.hessian_vector_product = counting
        try:
            t0 = time.perf_counter()
            h = ph.hessian(m, loss_fn, data=data, cuda=False)
            vals, _ = h.eigenvalues(top_n=top_n)
            return torch.tensor(vals), count["n"], time.perf_counter() - t0, "pyhessian"
        finally:
            ph.hessian_vector_product = orig
    except ImportError:
        return (*_power_recipe(m, loss_fn, data, top_n), "pyhessian-recipe")


def _power_recipe(m: nn.Module, loss_fn: nn.Module, data: tuple, top_n: int):
    """PyHessian's algorithm written here: eval mode, Gram-Schmidt deflation, rel. change 1e-3."""
    m.eval()
    X, y = data
    params = [p for p in m.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    grads = torch.autograd.grad(loss_fn(m(X), y), params, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    n = 0
    vals, vecs = [], []
    for _ in range(top_n):
        v = torch.randn_like(g)
        v /= v.norm()
        lam = None
        for _ in range(100):
            for u in vecs:
                v = v - (u @ v) * u
            v /= v.norm()
            Hv = torch.autograd.grad(g, params, grad_outputs=_split(v, params), retain_graph=True)
            Hv = torch.cat([x.reshape(-1) for x in Hv])
            n += 1
            new = float(Hv @ v)
            v = Hv / Hv.norm()
            if lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < 1e-3:
                lam = new
                break
            lam = new
        vals.append(lam)
        vecs.append(v)
    return torch.tensor(vals), n, time.perf_counter() - t0


def _split(v: torch.Tensor, params: list) -> list:
    return [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]


def eigenthings_power(H: HessianOperator, k: int):
    try:
        from hessian_eigenthings import LambdaOperator, deflated_power_iteration
    except ImportError:
        return None
    count0 = H.num_matvecs
    op = LambdaOperator(H.matvec, size=H.shape[0], device=H.device, dtype=H.dtype)
    t0 = time.perf_counter()
    r = deflated_power_iteration(op, k=k, seed=0)
    vals = torch.sort(r.eigenvalues, descending=True).values
    return vals, H.num_matvecs - count0, time.perf_counter() - t0


def rel_err(est: torch.Tensor, ref: torch.Tensor) -> float:
    k = min(len(est), len(ref))
    e = torch.sort(est.double().cpu(), descending=True).values[:k]
    return float(((e - ref[:k].cpu()) / ref[:k].cpu()).abs().max())


def run_nncurv(H: HessianOperator, k: int, ref: torch.Tensor, **kw: object) -> tuple:
    r = eigenvalues(H, k=k, **kw)  # type: ignore[arg-type]
    return r, rel_err(r.eigenvalues, ref)


def row(name: str, products: int, seconds: float, err: float, extra: str = "") -> None:
    print(f"  {name:<44} {products:>6d} {seconds:>8.2f}s {err:>10.2e}  {extra}")


def bench(label: str, model: nn.Module, loss_fn: nn.Module, data: tuple) -> None:
    X, y = data
    print(f"\n{label}: {sum(p.numel() for p in model.parameters())} parameters, batch {len(X)}")
    ref = truth(model, loss_fn, data, k=6)
    print(f"  truth (float64 Lanczos, tol 1e-10): top-5 = {[round(float(x), 5) for x in ref[:5]]}")
    print(f"  {'method':<44} {'HVPs':>6} {'time':>9} {'rel.err':>10}")
    H = HessianOperator(CurvatureProblem(model, loss_fn, data))
    for k in (1, 5):
        ph_vals, ph_n, ph_t, ph_name = pyhessian_power(model, loss_fn, data, k)
        row(f"top-{k} {ph_name} power (tol 1e-3)", ph_n, ph_t, rel_err(ph_vals, ref))
        et = eigenthings_power(H, k)
        if et is not None:
            row(f"top-{k} hessian-eigenthings deflated power", et[1], et[2], rel_err(et[0], ref))
        for tol in (None, 1e-2):
            r, e = run_nncurv(H, k, ref, tol=tol)
            name = f"top-{k} nncurv lanczos (tol {'default' if tol is None else tol})"
            row(name, r.num_matvecs, r.wall_time, e, f"converged={r.converged}")
            if tol is None:
                default_n = r.num_matvecs
        r, e = run_nncurv(H, k, ref, method="block", tol=1e-2)
        row(f"top-{k} nncurv block (b={k}, tol 1e-2)", r.num_matvecs, r.wall_time, e)
        if k > 1:
            # what any Krylov method can reach from this start: Lanczos without restarts
            # stopped after exactly 40 products (the budget for top-5 within 1e-3)
            r, e = run_nncurv(H, k, ref, tol=1e-12, ncv=60, max_matvecs=40)
            row(f"top-{k} Lanczos, no restart, 40 products", r.num_matvecs, r.wall_time, e)
        print(
            f"  -> top-{k}: nncurv default {default_n} HVPs vs PyHessian {ph_n} "
            f"(ratio {default_n / ph_n:.2f})"
        )

    n_oracle = power_until(H, float(ref[0]), 1e-3)
    row(
        "top-1 power iteration, oracle stop at 1e-3",
        n_oracle,
        float("nan"),
        1e-3,
        "(products PyHessian's recipe needs to be within 1e-3 of the truth)",
    )

    # warm start after 3 more SGD steps
    prev = eigenvalues(H, k=5, return_eigenvectors=True)
    moved = copy.deepcopy(model)
    sgd(moved, loss_fn, X, y, steps=3)
    ref2 = truth(moved, loss_fn, data, k=6)
    H2 = HessianOperator(CurvatureProblem(moved, loss_fn, data))
    assert prev.eigenvectors is not None
    for k in (1, 5):
        for tol in (None, 1e-2):
            t = "default" if tol is None else tol
            cold, ec = run_nncurv(H2, k, ref2, tol=tol)
            warm, ew = run_nncurv(H2, k, ref2, tol=tol, v0=prev.eigenvectors[:, :k])
            row(f"3 SGD steps later: top-{k} cold (tol {t})", cold.num_matvecs, cold.wall_time, ec)
            row(
                f"3 SGD steps later: top-{k} warm lanczos",
                warm.num_matvecs,
                warm.wall_time,
                ew,
                f"warm/cold = {warm.num_matvecs / cold.num_matvecs:.2f}",
            )
            if k > 1:
                wb, eb = run_nncurv(
                    H2, k, ref2, tol=tol, method="block", v0=prev.eigenvectors[:, :k]
                )
                row(
                    f"3 SGD steps later: top-{k} warm block",
                    wb.num_matvecs,
                    wb.wall_time,
                    eb,
                    f"warm/cold = {wb.num_matvecs / cold.num_matvecs:.2f}",
                )


def power_until(H: HessianOperator, lam: float, target: float, max_iter: int = 500) -> int:
    """Products power iteration (random start, as PyHessian) needs to get within ``target``."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(H.shape[0], generator=g, dtype=H.dtype)
    v /= v.norm()
    for i in range(1, max_iter + 1):
        w = H @ v
        if abs(float(v @ w) - lam) <= target * abs(lam):
            return i
        v = w / w.norm()
    return max_iter


def bench_bn() -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = SmallCNN(bn=True)
    X = torch.randn(128, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    model.train()
    sgd(model, nn.CrossEntropyLoss(), X, y, steps=20)  # running stats drift from batch stats
    print("\nCNN+BN in train mode (batch statistics), batch 128")
    ref = truth(model, nn.CrossEntropyLoss(), (X, y), k=2, batchnorm="batch")
    print(f"  {'method':<44} {'HVPs':>6} {'time':>9} {'rel.err':>10}")
    ph_vals, ph_n, ph_t, ph_name = pyhessian_power(model, nn.CrossEntropyLoss(), (X, y), 1)
    row(f"top-1 {ph_name} (forces eval mode)", ph_n, ph_t, rel_err(ph_vals, ref))
    H = HessianOperator(CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y), batchnorm="batch"))
    r, e = run_nncurv(H, 1, ref)
    row("top-1 nncurv lanczos, batchnorm='batch'", r.num_matvecs, r.wall_time, e)


def main() -> None:
    threads()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = mlp()
    X = torch.randn(512, 64, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    sgd(m, nn.CrossEntropyLoss(), X, y, steps=30)
    bench("MLP, CE", m, nn.CrossEntropyLoss(), (X, y))
    c = SmallCNN()
    Xc = torch.randn(256, 1, 16, 16, generator=g)
    yc = torch.randint(0, 10, (256,), generator=g)
    sgd(c, nn.CrossEntropyLoss(), Xc, yc, steps=30)
    bench("CNN, CE", c, nn.CrossEntropyLoss(), (Xc, yc))
    bench_bn()
    print(
        f"\ntotal {time.perf_counter() - t0:.0f}s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
