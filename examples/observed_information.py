"""Observed information in practice: standard errors of a logistic regression, metrics of an MLP.

Part 1 fits a logistic regression to scikit-learn's breast-cancer data (standardised; the ten
"mean ..." features, since with all thirty the classes are linearly separable and the
unpenalised maximum-likelihood estimate does not exist) by Newton's method on nncurv's
observed information, and prints each coefficient with its standard error and z-value.

Part 2 trains a small MLP on the digits data to its MAP estimate under a Gaussian prior (a
short full-batch L-BFGS run) and prints every metric of the observed information, and the
spectral ones of the Fisher, with their cost (products and seconds). A metric that is
undefined there (the observed information of a network is often indefinite) says why.

Run:  python examples/observed_information.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn

from nncurv.information import (
    ALL_METRICS,
    fisher_information,
    information_metrics,
    observed_information,
    standard_errors,
)


def logistic_regression() -> None:
    data = load_breast_cancer()
    X = torch.tensor(data.data[:, :10], dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=torch.float64).unsqueeze(1)
    names = [str(n) for n in data.feature_names[:10]] + ["(intercept)"]
    model = nn.Linear(10, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    loss = nn.BCEWithLogitsLoss()  # mean over samples: nncurv multiplies by N itself
    t0 = time.perf_counter()
    steps = 0
    while steps < 50:  # Newton: theta <- theta - I^{-1} grad(sum NLL)
        steps += 1
        info = observed_information(model, loss, (X, y), reduction="mean")
        _, grad_mean = info.problem.loss_and_gradient()
        grad_sum = grad_mean * info.scale
        delta = torch.linalg.solve(info.to_dense(), grad_sum)
        with torch.no_grad():
            flat = torch.cat([model.weight.reshape(-1), model.bias]) - delta
            model.weight.copy_(flat[:10].reshape(1, 10))
            model.bias.copy_(flat[10:])
        if float(delta.abs().max()) < 1e-12:
            break
    info = observed_information(model, loss, (X, y), reduction="mean")
    grad = info.problem.loss_and_gradient()[1] * info.scale
    se = standard_errors(info)
    print(
        f"Logistic regression, breast cancer (N={X.shape[0]}): {steps} Newton steps, "
        f"max |gradient| {float(grad.abs().max()):.1e}, {time.perf_counter() - t0:.2f} s"
    )
    print(f"{'coefficient':<24} {'estimate':>10} {'SE':>8} {'z':>8} {'p':>9}")
    est = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    for name, b, s in zip(names, est.tolist(), se.values.tolist()):
        z = b / s
        p = math.erfc(abs(z) / math.sqrt(2))
        print(f"{name:<24} {b:>10.4f} {s:>8.4f} {z:>8.2f} {p:>9.2e}")
    print(f"(smallest eigenvalue of I: {se.smallest_eigenvalue:.3g}; SEs = sqrt(diag(I^-1)))\n")


def mlp_metrics(quick: bool) -> None:
    X_np, y_np = load_digits(return_X_y=True)
    n = 500 if quick else len(X_np)
    X = torch.tensor(X_np[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(y_np[:n])
    torch.manual_seed(0)
    hidden = 8 if quick else 12
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    prior = 1.0  # Gaussian prior precision; the MAP minimises sum NLL + prior/2 |theta|^2
    steps = 60 if quick else 100
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y, reduction="sum")
        loss = loss + 0.5 * prior * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    t0 = time.perf_counter()
    opt.step(closure)
    seconds = time.perf_counter() - t0
    closure()
    gnorm = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))  # type: ignore[operator]
    opt.zero_grad()
    acc = float((model(X).argmax(1) == y).double().mean())
    P = sum(p.numel() for p in model.parameters())
    print(
        f"MLP on digits: N={n}, P={P}, {steps} full-batch L-BFGS iterations in {seconds:.1f} s "
        f"(|gradient| {gnorm:.1e}), train accuracy {acc:.3f}"
    )
    options = dict(
        prior_precision=prior,  # logdet(I + prior Id): the Occam factor of the evidence
        damping=prior,  # standard errors / TIC of the Laplace posterior I + prior Id
        subset="2.bias",  # posterior SDs of the output biases, by CG on the full operator
        se_method="cg",
        num_top=3,
        trace_matvecs=20,
        condition_matvecs=60,
        slq_probes=2,
        slq_steps=15,
        tic_probes=3,
        cg_tol=1e-4,
        gap_probes=4,
    )
    info = observed_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    t0 = time.perf_counter()
    # standard errors and TIC need I + prior*Id positive definite, which holds only at an exact
    # MAP (the condition-number line shows whether I is indefinite); take them from the Fisher
    observed_metrics = [k for k in ALL_METRICS if k not in ("standard_errors", "tic")]
    m = information_metrics(info, metrics=observed_metrics, **options)  # type: ignore[arg-type]
    print(f"\nobserved information ({time.perf_counter() - t0:.1f} s in all):")
    print(m.summary())
    fisher = fisher_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    t0 = time.perf_counter()
    wanted = [k for k in ALL_METRICS if k != "gap"]
    mf = information_metrics(fisher, metrics=wanted, **options)  # type: ignore[arg-type]
    print(
        f"\nFisher information (the GGN, positive semi-definite; {time.perf_counter() - t0:.1f} s):"
    )
    print(mf.summary())
    if mf.standard_errors is not None:
        sds = ", ".join(f"{v:.3f}" for v in mf.standard_errors.values.tolist())
        print(f"Laplace-GGN posterior SDs of the output biases: {sds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller MLP and data")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    logistic_regression()
    mlp_metrics(args.quick)


if __name__ == "__main__":
    main()
