"""21×21 loss-landscape grid on a digits MLP: nncurv (vmapped, functional) vs a plain loop.

The baseline does what loss-landscapes (marcellodebernardi/loss-landscapes, 3.0.6) does: it
keeps a copy of the model, writes each grid point's parameters into it in place
(``p.copy_(start + a d1 + b d2)``), and evaluates the loss with autograd recording and one
``.item()`` per point. nncurv never touches the model: ``chunk_size`` points at a time, under
``no_grad``, it computes the first layer's outputs as one product with the precomputed
``[L(x; W_0, b_0); L(x; D_1); L(x; D_2)]``, runs the rest of an MLP as batched products
(other models: ``functional_call`` under ``torch.func.vmap``) and the loss with ``logsumexp``.
Both use the same filter-normalised directions; the values are compared before timing.

    .venv/bin/python benchmarks/landscape.py [--device cuda] [--steps 21] [--repeat 3]
        [--chunk-size 2 4 8] [--samples N]

Prints the median seconds of each, the ratio (target: vectorised >= 3x faster) and the largest
difference of the loss values.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mlp, threads, timeit_many  # noqa: E402

from nncurv import CurvatureProblem  # noqa: E402
from nncurv._landscape_eval import evaluate_points  # noqa: E402
from nncurv.landscape import random_direction, slice_2d  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(d.target, dtype=torch.long, device=device)
    return X, y


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 200) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def describe(model: nn.Module) -> str:
    sizes = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    last = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return "-".join(str(s) for s in sizes + last)


def loop_grid(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    d1: dict[str, torch.Tensor],
    d2: dict[str, torch.Tensor],
    axis: np.ndarray,
    grad: bool = True,
) -> np.ndarray:
    """loss-landscapes' way: a model copy whose parameters are overwritten at every point.

    ``grad=True`` records autograd as loss-landscapes does; ``grad=False`` is a tuned loop.
    """
    work = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(work.named_parameters())
    out = np.empty((len(axis), len(axis)))
    for i, a in enumerate(axis):
        for j, b in enumerate(axis):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n] + float(a) * d1[n] + float(b) * d2[n])
            with torch.set_grad_enabled(grad):
                out[i, j] = nn.functional.cross_entropy(work(X), y).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--samples", type=int, default=None, help="evaluate on the first N samples (default: all)"
    )
    parser.add_argument(
        "--model",
        choices=["bench", "example"],
        default="bench",
        help="bench: _common.mlp() (64-128-96-10); example: examples/digits.py's _mlp at its "
        "default width (64-64-64-10)",
    )
    args = parser.parse_args()
    threads()
    device = torch.device(args.device)
    torch.manual_seed(0)
    X, y = digits(device)
    if args.model == "bench":
        model = mlp().to(device)
    else:
        import inspect

        import digits as example  # examples/digits.py

        width = inspect.signature(example.DigitsClassifier.__init__).parameters["width"].default
        model = example._mlp(width).to(device)
    train(model, X, y)
    model.eval()
    if args.samples is not None:
        X, y = X[: args.samples], y[: args.samples]
    problem = CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))
    d1, d2 = random_direction(problem, seed=1), random_direction(problem, seed=2)
    axis = np.linspace(-1.0, 1.0, args.steps)

    def ours(chunk: int, vectorize: bool = True) -> np.ndarray:
        s = slice_2d(problem, d1, d2, coords=(axis, axis), chunk_size=chunk, vectorize=vectorize)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return s.loss

    grid = np.stack([g.reshape(-1) for g in np.meshgrid(axis, axis, indexing="ij")], axis=1)
    coeffs = torch.as_tensor(grid, dtype=problem.dtype, device=device)

    def generic(chunk: int) -> np.ndarray:
        """The same grid without the first-layer affine precomputation (every point runs the
        whole network)."""
        ev = evaluate_points(
            problem,
            problem.params,
            [d1.vector, d2.vector],
            coeffs,
            chunk_size=chunk,
            precompute_first_layer=False,
        )
        assert not ev.first_layer_precomputed
        return ev.loss.double().cpu().numpy().reshape(len(axis), len(axis))

    check = evaluate_points(
        problem, problem.params, [d1.vector, d2.vector], coeffs[:2], chunk_size=2
    )
    print(
        f"first-layer affine precomputation used by slice_2d: {check.first_layer_precomputed}; "
        f"rest as batched products (MLP): {check.batched_mlp}"
    )

    ref = loop_grid(model, X, y, d1.vector, d2.vector, axis)
    for c in args.chunk_size:
        diff = np.abs(ours(c) - ref).max()
        rel = diff / np.abs(ref).max()
        print(f"chunk {c}: max |nncurv - loop| = {diff:.2e} (relative {rel:.2e})")
        assert rel < 1e-4, "values differ"

    diff = np.abs(ours(1, vectorize=False) - ref).max() / np.abs(ref).max()
    print(f"functional loop: relative difference {diff:.2e}")
    assert diff < 1e-4, "values differ"
    for c in args.chunk_size:
        diff = np.abs(generic(c) - ref).max() / np.abs(ref).max()
        print(f"generic path (no precomputation) chunk {c}: relative difference {diff:.2e}")
        assert diff < 1e-4, "values differ"

    fns = {f"nncurv vmap chunk={c}": (lambda c=c: ours(c)) for c in args.chunk_size}
    fns.update({f"generic vmap chunk={c}": (lambda c=c: generic(c)) for c in args.chunk_size})
    fns["nncurv functional loop"] = lambda: ours(1, vectorize=False)
    fns["loop (loss-landscapes way)"] = lambda: loop_grid(model, X, y, d1.vector, d2.vector, axis)
    fns["loop under no_grad"] = lambda: loop_grid(
        model, X, y, d1.vector, d2.vector, axis, grad=False
    )
    times = timeit_many(fns, repeat=args.repeat, warmup=1)
    n = args.steps**2
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{args.steps}x{args.steps} grid = {n} points, {args.model} digits MLP "
        f"{describe(model)} ({params} parameters), "
        f"{len(y)} samples, {device}, {torch.get_num_threads()} threads"
    )
    base = times["loop (loss-landscapes way)"]
    for k, t in times.items():
        print(f"  {k:<32} {t:8.3f} s   {1e3 * t / n:7.3f} ms/point   speed-up {base / t:5.2f}x")
    best = min(t for k, t in times.items() if k.startswith("nncurv vmap"))
    print(f"ratio loop / nncurv vmap (best chunk): {base / best:.2f}x (target >= 3x)")
    print(
        f"ratio no_grad loop / nncurv vmap (best chunk): {times['loop under no_grad'] / best:.2f}x"
    )
    best_generic = min(t for k, t in times.items() if k.startswith("generic vmap"))
    print(
        f"ratio generic vmap / nncurv vmap (best chunks; gain of the first-layer "
        f"precomputation): {best_generic / best:.2f}x"
    )
    if device.type == "cpu":
        print(
            "note: on CPU the grid is compute-bound; vmap saves Python overhead and kernel\n"
            "launches, which matter on GPUs. On a CPU shared with other jobs, multi-threaded\n"
            "timings are distorted by OpenMP contention; compare with NNCURV_BENCH_THREADS=1."
        )


if __name__ == "__main__":
    main()
