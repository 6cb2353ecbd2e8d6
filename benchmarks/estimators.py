"""Trace and diagonal estimators on network Hessians, measured against exact values.

Small variants of the benchmark MLP (1.8k parameters) and CNN (512, 8×8 inputs) after a few SGD
steps, so that the exact trace and diagonal (one HVP per parameter) are affordable. At a budget
of 100 HVPs, each estimator is repeated over 20 seeds and its relative error is reported: ``|t -
tr H| / |tr H|`` (RMS over seeds) and ``||d - diag H|| / ||diag H||`` (mean over seeds), with
its ratio to Hutchinson's and side by side with the reported standard errors. The default
``"auto"`` (``trace``/``diagonal`` without ``method``) spends half the budget on XTrace's
sketch, predicts from it the variances of XTrace/XDiag and of Hutchinson with the whole budget,
and finishes the better one (its most frequent choice is shown in brackets). Baselines written
the way the peers do it: plain Rademacher Hutchinson (PyHessian's ``trace`` with a fixed number
of samples), Hutch++ (hessian-eigenthings' default) and XDiag as curvlinops implements it
(``xdiag_curvlinops`` below; nncurv's ``xdiag`` computes the cross term exactly). Also: exact /
Monte-Carlo GGN diagonals; trace and diagonal estimators on the GGN of the full-size MLP and
CNN, whose exact diagonal (and trace) ``ggn_diagonal`` computes with C VJPs per sample; and the
peak memory of 100 Hutchinson probes on the full-size CNN (21.6k parameters, batch 256),
chunked.

Targets (issue 3): trace at 100 products, default/Hutchinson <= 1/3 on the CNN (outliers) and
<= 1.5 on the MLP (flat spectrum); the last lines summarise the ratios.

Run: ``.venv/bin/python benchmarks/estimators.py`` (about 5 minutes on 2 CPU cores; set
``NNCURV_BENCH_THREADS=1`` for single-threaded timings); ``--full-cnn-hessian`` adds the
Hessian of the full-size CNN (about 10 minutes more).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, mlp, peak_memory, threads  # noqa: E402

from nncurv import CurvatureProblem, GGNOperator, HessianOperator  # noqa: E402
from nncurv.linalg import (  # noqa: E402
    diagonal,
    exact_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xdiag,
    xtrace,
)

warnings.filterwarnings("ignore")
BUDGET = 100
SEEDS = 20
RATIOS: dict[tuple[str, str], float] = {}


def _picks(methods: list[str]) -> str:
    """``"  [auto:xtrace 20/20]"`` for the auto method, else empty."""
    auto = [m for m in methods if m.startswith("auto:")]
    if not auto:
        return ""
    top = max(set(auto), key=auto.count)
    return f"  [{top} {auto.count(top)}/{len(methods)}]"


GGN_SEEDS = 10


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 10),
    )  # fmt: skip


def xdiag_curvlinops(op, num_matvecs: int, seed: int = 0):  # noqa: ANN001, ANN201
    """XDiag written as curvlinops does (``diagonal/epperly2024xtrace.py``), in torch."""
    from types import SimpleNamespace

    from nncurv.linalg._checks import random_probes
    from nncurv.linalg.trace import _deflate, _loo_vectors

    t0 = time.perf_counter()
    s = num_matvecs // 2
    Om = random_probes(op, s, "rademacher", op.new_generator(seed))
    Y = op.matmat(Om)
    Q, R = torch.linalg.qr(Y)
    Z = op.matmat(Q)
    S = _loo_vectors(R)
    d = (Q * Z).sum(1) - ((Q @ S) * (Z @ S)).mean(1)
    d = d + (Om * (Y - Q @ _deflate(Z.T @ Om, S))).mean(1)
    return SimpleNamespace(estimate=d, standard_error=torch.full_like(d, float("nan")),
                           wall_time=time.perf_counter() - t0)  # fmt: skip


def sgd(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 30) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def bench(
    label: str,
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    mode: str = "forward-over-reverse",
) -> None:
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))
    H = HessianOperator(problem, mode=mode, chunk_size=128)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    d_true = exact_diagonal(H, chunk_size=128).estimate.double()
    t_true = float(d_true.sum())
    n = H.shape[0]
    print(
        f"\n{label}: {n} parameters, batch {len(X)}; exact diagonal/trace from {n} HVPs "
        f"in {time.perf_counter() - t0:.1f}s; tr H = {t_true:.5g}"
    )
    print(
        f"  {'trace estimator @ ' + str(BUDGET) + ' HVPs':<40} {'rel.err (RMS)':>14} "
        f"{'/hutchinson':>12} {'mean SE/|tr|':>13} {'time':>8}"
    )
    rms = {}
    for name, fn in [("hutchinson (PyHessian-style)", hutchinson_trace),
                     ("hutch++ (hessian-eigenthings default)", hutchpp_trace),
                     ("xtrace", xtrace),
                     ("auto (nncurv default)", trace)]:  # fmt: skip
        errs, ses, secs, picks = [], [], [], []
        for s in range(SEEDS):
            r = fn(H, BUDGET, seed=s)
            errs.append((r.estimate - t_true) / abs(t_true))
            ses.append(r.standard_error / abs(t_true))
            secs.append(r.wall_time)
            picks.append(r.method)
        rms[name] = math.sqrt(sum(e * e for e in errs) / SEEDS)
        ratio = rms[name] / rms["hutchinson (PyHessian-style)"]
        print(
            f"  {name:<40} {rms[name]:>14.2e} {ratio:>12.2f} {sum(ses) / SEEDS:>13.2e} "
            f"{sum(secs) / SEEDS:>7.2f}s" + _picks(picks)
        )
    print(
        f"  {'diagonal estimator @ ' + str(BUDGET) + ' HVPs':<40} {'rel.err (mean)':>14} "
        f"{'/hutchinson':>12} {'SE calib.':>13} {'time':>8}"
    )
    derr = {}
    for name, fn in [("hutchinson", hutchinson_diagonal),
                     ("xdiag as in curvlinops", xdiag_curvlinops),
                     ("xdiag (symmetric form)", xdiag),
                     ("auto (nncurv default)", diagonal)]:  # fmt: skip
        errs, calib, secs, picks = [], [], [], []
        for s in range(SEEDS):
            r = fn(H, BUDGET, seed=s)
            e = r.estimate.double() - d_true
            errs.append(float(e.norm() / d_true.norm()))
            calib.append(float((e.abs() <= 2 * r.standard_error.double()).double().mean()))
            secs.append(r.wall_time)
            picks.append(getattr(r, "method", "xdiag"))
        derr[name] = sum(errs) / SEEDS
        ratio = derr[name] / derr["hutchinson"]
        print(
            f"  {name:<40} {derr[name]:>14.2e} {ratio:>12.2f} {sum(calib) / SEEDS:>12.0%}  "
            f"{sum(secs) / SEEDS:>7.2f}s" + _picks(picks)
        )
    print("  (SE calib. = fraction of entries within 2 reported standard errors; ~95% is honest)")
    for kind, table, default in (("trace", rms, "auto (nncurv default)"),
                                 ("diagonal", derr, "auto (nncurv default)")):  # fmt: skip
        h = table["hutchinson (PyHessian-style)" if kind == "trace" else "hutchinson"]
        RATIOS[(label, kind)] = table[default] / h
    print(
        f"  -> default (auto) / hutchinson error ratio: trace "
        f"{RATIOS[(label, 'trace')]:.2f}, diagonal {RATIOS[(label, 'diagonal')]:.2f}"
    )

    G = GGNOperator(problem, mode="forward", chunk_size=64)
    ex = ggn_diagonal(problem)  # equals the dense GGN's diagonal to 1e-10 (tests)
    g_true = ex.estimate.double()
    mc = [ggn_diagonal(problem, method="mc", seed=s) for s in range(5)]
    gnb = [ggn_diagonal(problem, method="gnb", seed=s) for s in range(5)]
    xd = [diagonal(G, BUDGET, seed=s) for s in range(5)]

    def mean_err(rs: list) -> float:
        return sum(float((r.estimate.double() - g_true).norm() / g_true.norm()) for r in rs) / 5

    print(
        f"  GGN diagonal: exact ({ex.num_matvecs} per-sample VJPs) in {ex.wall_time:.2f}s; "
        f"rel.err MC (1 VJP/sample) {mean_err(mc):.2e}; "
        f"GNB (1 backward) {mean_err(gnb):.2e}; auto@{BUDGET} GGN-vps {mean_err(xd):.2e}"
    )


def bench_ggn(label: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """Full-size networks: the GGN's exact diagonal (and trace) costs C VJPs per sample."""
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))
    ex = ggn_diagonal(problem)
    d_true = ex.estimate.double()
    t_true = float(d_true.sum())
    G = GGNOperator(problem, mode="forward", chunk_size=50)
    print(
        f"\n{label} GGN: {G.shape[0]} parameters, batch {len(X)}; exact diagonal from "
        f"{ex.num_matvecs} per-sample VJPs in {ex.wall_time:.1f}s; tr G = {t_true:.5g}"
    )
    rms = {}
    for name, fn in [("hutchinson", hutchinson_trace), ("hutch++", hutchpp_trace),
                     ("xtrace", xtrace), ("auto (default)", trace)]:  # fmt: skip
        errs = [(fn(G, BUDGET, seed=s).estimate - t_true) / t_true for s in range(GGN_SEEDS)]
        rms[name] = math.sqrt(sum(e * e for e in errs) / GGN_SEEDS)
    dd = {}
    for name, fn in [("hutchinson", hutchinson_diagonal), ("xdiag", xdiag),
                     ("xdiag as in curvlinops", xdiag_curvlinops),
                     ("auto (default)", diagonal)]:  # fmt: skip
        errs = [
            float((fn(G, BUDGET, seed=s).estimate.double() - d_true).norm() / d_true.norm())
            for s in range(GGN_SEEDS)
        ]
        dd[name] = sum(errs) / GGN_SEEDS
    print(
        f"  trace @ {BUDGET} GGN-vps, rel.err (RMS over {GGN_SEEDS} seeds): "
        + ", ".join(f"{k} {v:.2e}" for k, v in rms.items())
        + f"; auto/hutchinson = {rms['auto (default)'] / rms['hutchinson']:.2f}"
    )
    print(
        f"  diagonal @ {BUDGET} GGN-vps, rel.err: "
        + ", ".join(f"{k} {v:.2e}" for k, v in dd.items())
        + f"; auto/hutchinson = {dd['auto (default)'] / dd['hutchinson']:.2f}"
    )


def bench_callback_trace(arch: str, steps: int = 600, budget: int = 10, seeds: int = 200) -> None:
    """The CurvatureMonitor's trace at its default budget: XTrace and Hutchinson against
    Hutchinson on the complement of the Krylov basis a loose top-1 Lanczos run leaves (free)."""
    import itertools

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import DigitsClassifier, make_loader

    from nncurv.linalg import deflated_hutchinson_trace, eigenvalues, exact_trace

    torch.manual_seed(0)
    model = DigitsClassifier(arch, lr=0.1)
    loader = make_loader(batch_size=32)
    probe = next(iter(loader))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _, (x, t) in zip(range(steps), batches):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), probe)
    H = HessianOperator(problem, mode="cached", chunk_size=256)
    t_true = exact_trace(H, chunk_size=256).estimate
    e = eigenvalues(H, 1, tol=1e-2, return_basis=True)
    assert e.krylov_basis is not None and e.krylov_projection is not None
    V, tv = e.krylov_basis, e.krylov_projection.trace()
    fns = {
        "hutchinson": lambda s: hutchinson_trace(H, budget, seed=s),
        "xtrace (callback default alone)": lambda s: xtrace(H, budget, seed=s),
        "deflated (default pair)": lambda s: deflated_hutchinson_trace(
            H, V, budget, basis_trace=tv, seed=s
        ),
    }
    rms = {}
    for name, fn in fns.items():
        errs = [(fn(s).estimate - t_true) / abs(t_true) for s in range(seeds)]
        rms[name] = math.sqrt(sum(x * x for x in errs) / len(errs))
    print(
        f"\ncallback trace, digits {arch} ({H.shape[0]} parameters, batch 32, after {steps} SGD "
        f"steps), {budget} products, basis from a top-1 run ({V.shape[1]} vectors, "
        f"{e.num_matvecs} products), RMS relative error over {seeds} seeds:"
    )
    for name, r in rms.items():
        print(f"  {name:<34} {r:.2e}  ({r / rms['hutchinson']:.2f} of Hutchinson)")


def memory() -> None:
    g = torch.Generator().manual_seed(5)
    model = SmallCNN()
    X = torch.randn(256, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    H = HessianOperator(CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y)), chunk_size=8)
    H @ torch.zeros(H.shape[0])  # build the cached graph outside the measurement
    t0 = time.perf_counter()
    mem = peak_memory(lambda: hutchinson_trace(H, 100, chunk_size=8), torch.device("cpu"))
    dt = time.perf_counter() - t0
    print(
        f"\nFull-size CNN ({H.shape[0]} parameters, batch 256): 100 Hutchinson probes in chunks "
        f"of 8 raise the peak RSS by {mem / 2**20:.0f} MiB ({dt:.1f}s)"
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full-cnn-hessian",
        action="store_true",
        help="also the Hessian of the full-size CNN (21.5k parameters; its exact trace takes "
        "21.5k HVPs, about 4 minutes on one core, the estimators about 5 more)",
    )
    args = parser.parse_args()
    threads()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = small_mlp()
    X = torch.randn(64, 64, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    sgd(m, X, y)
    bench("small MLP, CE", m, X, y)
    c = small_cnn()
    Xc = torch.randn(32, 1, 8, 8, generator=g)
    yc = torch.randint(0, 10, (32,), generator=g)
    sgd(c, Xc, yc)
    bench("small CNN, CE", c, Xc, yc)
    g2 = torch.Generator().manual_seed(1)
    m = mlp()
    X = torch.randn(256, 64, generator=g2)
    y = torch.randint(0, 10, (256,), generator=g2)
    sgd(m, X, y)
    bench_ggn("full-size MLP", m, X, y)
    c = SmallCNN()
    Xc = torch.randn(128, 1, 16, 16, generator=g2)
    yc = torch.randint(0, 10, (128,), generator=g2)
    sgd(c, Xc, yc)
    bench_ggn("full-size CNN", c, Xc, yc)
    bench_callback_trace("mlp")
    bench_callback_trace("cnn")
    if args.full_cnn_hessian:
        bench("full-size CNN Hessian", c, Xc, yc, mode="cached")
    memory()
    print("\ndefault (auto) / hutchinson error ratio at 100 products:")
    for (label, kind), ratio in RATIOS.items():
        print(f"  {label:<16} {kind:<9} {ratio:.2f}")
    print(
        f"\ntotal {time.perf_counter() - t0:.0f}s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
