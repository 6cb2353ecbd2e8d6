"""Cost of each information metric, in seconds and in units of one gradient, side by side.

Model: the benchmark MLP (~21.7k parameters) on the digits data (N = 1797, float32), trained
for a few Adam epochs. First the unit products are timed round-robin: one full-data gradient,
one observed-information product (HVP), one Fisher (GGN) product and one empirical-Fisher
product. Then each metric of :func:`nncurv.information.information_metrics` is run alone with
its default budget, the metrics interleaved over ``--repeat`` rounds, and reported as median
seconds, products and "gradients" (seconds / one gradient).

Run: ``.venv/bin/python benchmarks/information.py`` (``--quick``: 400 samples, 1 round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mlp, threads, timeit_many  # noqa: E402

from nncurv.information import (  # noqa: E402
    condition_number,
    effective_dimension,
    empirical_fisher,
    fisher_information,
    gradient_covariance,
    log_determinant,
    observed_fisher_gap,
    observed_information,
    standard_errors,
    takeuchi_criterion,
)
from nncurv.linalg import eigenvalues, trace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    threads()
    X_np, y_np = load_digits(return_X_y=True)
    n = 400 if args.quick else len(X_np)
    X = torch.tensor(X_np[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np[:n])
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        for idx in torch.randperm(n).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    data = (X, y)
    loss = nn.CrossEntropyLoss()
    info = observed_information(model, loss, data, reduction="mean")
    fisher = fisher_information(model, loss, data, reduction="mean")
    ef = empirical_fisher(model, loss, data, reduction="mean", cache=True)
    P = info.shape[0]
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))

    def gradient() -> object:
        return info.problem.loss_and_gradient()

    unit = timeit_many(
        {
            "gradient": gradient,
            "observed-information product": lambda: info @ v,
            "Fisher (GGN) product": lambda: fisher @ v,
            "empirical-Fisher product": lambda: ef @ v,
        },
        repeat=1 if args.quick else 5,
    )
    g = unit["gradient"]
    print(
        f"MLP P={P}, N={n}, {torch.get_num_threads()} threads; product modes: observed "
        f"{info.mode}, Fisher {fisher.mode}; one gradient {g * 1e3:.1f} ms"
    )
    for k, t in unit.items():
        print(f"  {k:<32} {t * 1e3:9.1f} ms  {t / g:7.2f} gradients")

    C = gradient_covariance(ef)
    prior = 1.0
    metrics: dict[str, Callable[[], object]] = {
        "trace (XTrace, 60)": lambda: trace(info, 60),
        "top-5 eigenvalues (Lanczos)": lambda: eigenvalues(info, 5),
        "logdet(I + Id) (SLQ 4x40)": lambda: log_determinant(
            info, prior, num_probes=4, num_steps=40
        ),
        "logdet(F + Id) (SLQ 4x40, Fisher)": lambda: log_determinant(
            fisher, prior, num_probes=4, num_steps=40
        ),
        "effective dimension (SLQ 4x40, Fisher)": lambda: effective_dimension(
            fisher, prior, num_probes=4, num_steps=40
        ),
        "condition (Lanczos, 3 bottom)": lambda: condition_number(
            info, num_bottom=3, max_matvecs=300
        ),
        "SEs of 10 biases (CG, Fisher+Id)": lambda: standard_errors(
            fisher, subset="4.bias", method="cg", damping=prior, tol=1e-4, max_iter=100
        ),
        "TIC (CG, 3 probes, Fisher+Id)": lambda: takeuchi_criterion(
            fisher, C, method="cg", damping=prior, num_probes=3, tol=1e-4, max_iter=100
        ),
        "observed-vs-Fisher gap (20 probes)": lambda: observed_fisher_gap(
            info, fisher, num_probes=20
        ),
    }
    rounds = 1 if args.quick else args.repeat
    times: dict[str, list[float]] = {k: [] for k in metrics}
    products: dict[str, int] = {}
    notes: dict[str, str] = {}
    for _ in range(rounds):  # interleaved: every metric sees the same machine conditions
        for k, fn in metrics.items():
            t0 = time.perf_counter()
            try:
                r = fn()
                products[k] = int(getattr(r, "num_matvecs", 0))
            except ValueError as err:  # undefined here (e.g. indefinite): the cost still counts
                notes[k] = str(err).split(";")[0][:90]
                products.setdefault(k, -1)
            times[k].append(time.perf_counter() - t0)
    print(f"\nmetric (median of {rounds} interleaved rounds)   seconds  products  gradients")
    for k, ts in times.items():
        t = statistics.median(ts)
        print(f"  {k:<38} {t:8.2f} {products[k]:9d} {t / g:10.0f}")
        if k in notes:
            print(f"      undefined: {notes[k]}")


if __name__ == "__main__":
    main()
