"""Hessian-vector products: nncurv's modes against a PyHessian-style baseline, side by side.

For each model: time per gradient (forward + backward), per HVP in each mode (a single product
from scratch, and repeated products at fixed parameters), per ``matmat`` of 8 columns, and the
peak memory of that ``matmat`` with chunks of 8 and of 2 columns. The baseline is written the
way PyHessian does it: ``autograd.grad(create_graph=True)`` once, then one ``autograd.grad`` per
product; the same recipe from scratch (graph plus one product) is timed too. All functions are
timed round-robin; one sample of a fast function is the mean of as many consecutive calls as fit
in 30 ms, so that a millisecond call is not timed right after a much larger neighbour alone.

Run: ``.venv/bin/python benchmarks/hvp.py`` (``--quick`` skips the ResNet-18).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResNet18, SmallCNN, mlp, peak_memory, threads, timeit_many  # noqa: E402

from nncurv import CurvatureProblem, HessianOperator  # noqa: E402

MODES = ["cached", "forward-over-reverse", "reverse-over-reverse"]


def configs(quick: bool) -> list[tuple[str, nn.Module, nn.Module, tuple, dict, int]]:
    g = torch.Generator().manual_seed(0)
    out = [
        ("MLP 21.7k, MSE, b=512", mlp(), nn.MSELoss(),
         (torch.randn(512, 64, generator=g), torch.randn(512, 10, generator=g)), {}, 7),
        ("CNN 21.6k, CE, b=256", SmallCNN(), nn.CrossEntropyLoss(),
         (torch.randn(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)),
         {}, 5),
        ("CNN+BN (running stats), b=256", SmallCNN(bn=True), nn.CrossEntropyLoss(),
         (torch.randn(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)),
         {"batchnorm": "eval"}, 5),
        ("CNN+BN (batch stats), b=256", SmallCNN(bn=True), nn.CrossEntropyLoss(),
         (torch.randn(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)),
         {"batchnorm": "batch"}, 5),
    ]  # fmt: skip
    if not quick:
        out.append(
            ("ResNet-18 11.2M, CE, 32x32, b=32", ResNet18(), nn.CrossEntropyLoss(),
             (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)),
             {"light": True}, 1)
        )  # fmt: skip
    return out


def bench(name, model, loss_fn, data, kwargs, repeat) -> dict[str, float | str]:
    X, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=gen)
    V8 = torch.randn(n, 8, generator=gen)
    kwargs = dict(kwargs)
    light = kwargs.pop("light", False)  # big models: fewer variants, one chunk size
    model.train(kwargs.get("batchnorm") == "batch")
    row: dict[str, float | str] = {"model": name, "params": n}
    problem = CurvatureProblem(model, loss_fn, (X, y), **kwargs)

    # PyHessian's recipe: one create_graph backward, then one backward per product
    grads = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    vs = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    fns = {
        "grad": lambda: torch.autograd.grad(loss_fn(model(X), y), params),
        "pyhessian_per_product": lambda: torch.autograd.grad(
            grads, params, grad_outputs=vs, retain_graph=True
        ),
        # the same recipe for one product from scratch: the least a double backward costs
        "pyhessian_single": lambda: torch.autograd.grad(
            torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True),
            params,
            grad_outputs=vs,
        ),
    }
    ops = {}
    for mode in MODES:
        if light and mode != "cached":
            continue
        try:
            op = HessianOperator(problem, mode=mode, chunk_size=8)
            op @ v
        except RuntimeError as err:
            row[f"{mode}:single"] = row[f"{mode}:repeated"] = f"n/a ({str(err)[:24]}…)"
            continue
        ops[mode] = op
        fns[f"{mode}:single"] = lambda m=mode: HessianOperator(problem, mode=m) @ v
        fns[f"{mode}:repeated"] = lambda op=op: op @ v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = HessianOperator(problem, chunk_size=8)
    row["auto_mode"] = auto.mode
    fns["auto:repeated"] = lambda: auto @ v
    fns["auto:matmat8"] = lambda: auto.matmat(V8)
    fns["auto:single"] = lambda: HessianOperator(problem) @ v  # default mode, from scratch
    if light:
        for mode in MODES:
            fns.pop(f"{mode}:single", None)
            if mode != auto.mode:
                fns.pop(f"{mode}:repeated", None)
                row[f"{mode}:single"] = row[f"{mode}:repeated"] = "skipped"
    row.update(timeit_many(fns, repeat, warmup=2, min_sample_seconds=0.03))
    for mode in MODES:
        row.setdefault(f"{mode}:single", "skipped")
        row.setdefault(f"{mode}:repeated", "skipped")
    for mode, op in ops.items():
        if light and mode != auto.mode:
            continue
        row[f"{mode}:mem8"] = peak_memory(lambda op=op: op.matmat(V8), problem.device)
        op.matmat_chunk_size = 2
        row[f"{mode}:mem2"] = peak_memory(lambda op=op: op.matmat(V8), problem.device)
    row["auto:matmat8_per_col"] = float(row["auto:matmat8"]) / 8
    return row


def fmt_ms(x: float | str) -> str:
    return x if isinstance(x, str) else f"{1e3 * x:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the ResNet-18")
    args = parser.parse_args()
    threads()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")
    rows = [bench(*c) for c in configs(args.quick)]
    print("## Time per product (ms; median)")
    head = ["model", "grad", "PyHessian/product"] + [f"{m} single" for m in MODES]
    head += [f"{m} repeated" for m in MODES] + ["matmat8/col (auto)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["model"]), fmt_ms(r["grad"]), fmt_ms(r["pyhessian_per_product"])]
        cells += [fmt_ms(r[f"{m}:single"]) for m in MODES]
        cells += [fmt_ms(r[f"{m}:repeated"]) for m in MODES]
        cells += [fmt_ms(r["auto:matmat8_per_col"])]
        print("| " + " | ".join(cells) + " |")
    print("\n## Ratios (default mode 'auto')")
    print("| model | auto picks | repeated product / PyHessian product (≤ 1) | "
          "single product, default mode / gradient (≤ 3) | best single product / gradient | "
          "PyHessian's recipe, single product / gradient | "
          "matmat8 per column / product |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        singles = [r[f"{m}:single"] for m in MODES if not isinstance(r[f"{m}:single"], str)]
        singles = singles or [r["auto:single"]]
        best_single = min(float(s) for s in singles)
        print(
            f"| {r['model']} | {r['auto_mode']} | "
            f"{float(r['auto:repeated']) / float(r['pyhessian_per_product']):.2f} | "
            f"{float(r['auto:single']) / float(r['grad']):.2f} | "
            f"{best_single / float(r['grad']):.2f} | "
            f"{float(r['pyhessian_single']) / float(r['grad']):.2f} | "
            f"{float(r['auto:matmat8_per_col']) / float(r['auto:repeated']):.2f} |"
        )
    print("\n## Peak memory of matmat with 8 columns (MB above the resident size)")
    print("| model | " + " | ".join(f"{m} chunk 8 / chunk 2" for m in MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for r in rows:
        cells = []
        for m in MODES:
            if f"{m}:mem8" in r:
                cells.append(
                    f"{float(r[f'{m}:mem8']) / 2**20:.0f} / {float(r[f'{m}:mem2']) / 2**20:.0f}"
                )
            else:
                cells.append("n/a")
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
