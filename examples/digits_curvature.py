"""Curvature of a small network trained on scikit-learn's digits: the core of nncurv end to end.

Trains an MLP classifier on the 8×8 digits (1797 images, 64 features) with plain PyTorch, then
analyses the loss at the trained parameters over the whole training set (a DataLoader, the last
batch short): Hessian and GGN top eigenvalues, the most negative Hessian eigenvalue, the trace,
the spectral density summary, and per-layer top eigenvalue and trace. Prints a short report with
what each number cost (products, seconds).

Run: ``.venv/bin/python examples/digits_curvature.py`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import nncurv
from nncurv.linalg import eigenvalues, spectral_density, trace


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed)
    mean, std = X_tr.mean(0), X_tr.std(0) + 1e-6
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return to_x(X_tr), torch.tensor(y_tr), to_x(X_te), torch.tensor(y_te)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=64, shuffle=True
    )
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and products")
    args = parser.parse_args()
    torch.manual_seed(0)
    X, y, X_te, y_te = load()
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    t0 = time.perf_counter()
    train(model, X, y, 3 if args.quick else args.epochs)
    acc = (model(X_te).argmax(1) == y_te).float().mean().item()
    print(f"trained {sum(p.numel() for p in model.parameters())}-parameter MLP on digits in "
          f"{time.perf_counter() - t0:.1f}s: test accuracy {acc:.3f}")  # fmt: skip

    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=500)
    problem = nncurv.CurvatureProblem(model, nn.CrossEntropyLoss(), loader)
    H = nncurv.HessianOperator(problem)
    G = nncurv.GGNOperator(problem)
    print(f"{problem}\nHessian products: mode {H.mode!r}\n")
    budget = 40 if args.quick else 100

    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: str, result: object) -> None:
        mv = getattr(result, "num_matvecs", "")
        wall = getattr(result, "wall_time", float("nan"))
        rows.append((name, value, str(mv), f"{wall:.2f}"))

    top = eigenvalues(H, k=5, return_eigenvectors=True)
    add("Hessian top-5 eigenvalues", ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()), top)
    low = eigenvalues(H, k=1, which="SA")
    add("Hessian most negative eigenvalue", f"{float(low.eigenvalues[0]):.4g}", low)
    ggn_top = eigenvalues(G, k=1)
    add("GGN (Fisher) top eigenvalue", f"{float(ggn_top.eigenvalues[0]):.4g}", ggn_top)
    tr = trace(H, budget)
    add(f"Hessian trace ({tr.method}, {budget} products)",
        f"{tr.estimate:.4g} ± {tr.standard_error:.2g}", tr)  # fmt: skip
    dens = spectral_density(
        H, num_probes=1 if args.quick else 2, num_steps=40 if args.quick else 80
    )
    add("Hessian SLQ: spectral mass below -1e-4", f"{dens.negative_mass(-1e-4):.2%}", dens)
    g_dens = spectral_density(G, num_steps=40 if args.quick else 80)
    eff, _ = g_dens.effective_dimension(1e-2)
    add("GGN SLQ: effective dimension (α=1e-2)", f"{eff:.1f}", g_dens)
    for layer, sub in problem.block_problems().items():
        Hl = nncurv.HessianOperator(sub)
        e = eigenvalues(Hl, k=1)
        t = trace(Hl, min(budget, Hl.shape[0]))
        add(f"layer {layer}: top eigenvalue / trace",
            f"{float(e.eigenvalues[0]):.4g} / {t.estimate:.4g}", e)  # fmt: skip

    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':<44} {'products':>8} {'seconds':>8}")
    for name, value, mv, wall in rows:
        print(f"{name:<{width}}  {value:<44} {mv:>8} {wall:>8}")
    print("\nconverged:", top.converged and low.converged and ggn_top.converged)
    same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    same_rng = torch.equal(rng_before, torch.random.get_rng_state())
    print(f"model state and global RNG unchanged by the analysis: {same and same_rng}")
    if not (same and same_rng):
        raise SystemExit("the analysis changed the model or the RNG state")


if __name__ == "__main__":
    main()
