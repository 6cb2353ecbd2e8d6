"""Cost of contractive penalties, measured side by side in one run.

1. Training-step time (forward, backward, Adam step) of a contractive auto-encoder relative to the
   plain one: closed form, one-probe Hutchinson and exact penalties, for 64-dimensional inputs
   (scikit-learn digits) and 784-dimensional ones (the digits upsampled to 28x28). Rows marked
   "(encode)" take the hidden units and the penalty from one ``ContractiveLoss.encode`` call;
   "reusing h" passes the training step's hidden units to the closed form.
2. The exact per-sample encoder Jacobian (``nncurv.jacobians.layer_jacobian``) against the loops
   that snippets use: one ``autograd.grad`` call per sample and output unit, and one call per
   output unit with the batch-sum trick.

Variants are timed in interleaved rounds (so that load from other processes affects all of them
alike) and the best round per variant is reported, the one least disturbed by that load. One
thread by default: on a shared 2-core machine, more threads mostly measure contention.

    python benchmarks/contractive.py [--rounds 7] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import nn

from nncurv.contractive import ContractiveLoss
from nncurv.jacobians import layer_jacobian


def digits(dim: int, device: torch.device) -> torch.Tensor:
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    if dim == 784:
        x = nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear")
        x = x.reshape(-1, 784).clamp(0, 1)
    return x.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    d: int, hidden: int, variant: str, device: torch.device, seed: int = 0
) -> Callable[[torch.Tensor], None]:
    """One Adam step of a sigmoid auto-encoder, with the penalty named by ``variant``."""
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid()).to(device)
    dec = nn.Sequential(nn.Linear(hidden, d), nn.Sigmoid()).to(device)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    method, _, vec = VARIANTS[variant]
    crit = ContractiveLoss(0.01, method=method, vectorize=vec) if method else None  # type: ignore[arg-type]
    reuse = variant == "closed form, reusing h"
    encode = variant.endswith("(encode)")

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if encode:  # hidden units and penalty from one call
            h, pen = crit.encode(enc, x)  # type: ignore[union-attr]
            loss = nn.functional.binary_cross_entropy(dec(h), x) + pen
        else:
            h = enc(x)
            loss = nn.functional.binary_cross_entropy(dec(h), x)
            if crit is not None:
                loss = loss + crit(enc, x, hidden=h if reuse else None)
        loss.backward()
        opt.step()

    return step


# name -> (ContractiveLoss method, kept in the fast interleaved group?, vectorize)
VARIANTS: dict[str, tuple[str | None, bool, str]] = {
    "plain AE": (None, True, "auto"),
    "closed form": ("closed_form", True, "auto"),
    "closed form, reusing h": ("closed_form", True, "auto"),
    "closed form (encode)": ("closed_form", True, "auto"),
    "Hutchinson, 1 probe": ("hutchinson", True, "auto"),
    "Hutchinson, 1 probe (encode)": ("hutchinson", True, "auto"),
    "Hutchinson, 1 probe, vmap": ("hutchinson", True, "vmap"),
    "exact": ("exact", False, "auto"),
    "exact, vmap": ("exact", False, "vmap"),
}


CLOCK: Callable[[], float] = time.perf_counter


def time_it(fn: Callable[[], None], device: torch.device, repeat: int) -> float:
    sync(device)
    t = CLOCK()
    for _ in range(repeat):
        fn()
    sync(device)
    return (CLOCK() - t) / repeat


def training_steps(args: argparse.Namespace, device: torch.device) -> list[str]:
    rows = []
    for d, hidden in [(64, 64), (784, 256)]:
        data = digits(d, device)
        bs = args.batch_size
        batches = [data[i : i + bs] for i in range(0, 8 * bs, bs)]
        counter = iter(range(10**9))
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for fast in (True, False):  # the memory-hungry exact variants in their own rounds
            group = [k for k, v in VARIANTS.items() if v[1] == fast or k == "plain AE"]
            steps = {k: make_step(d, hidden, k, device) for k in group}
            repeat = args.repeat if fast else max(1, args.repeat // 10)
            for k in group:  # warm-up
                for _ in range(3):
                    steps[k](batches[next(counter) % len(batches)])
            for _ in range(args.rounds):
                for k in group:
                    step = steps[k]
                    t = time_it(
                        lambda s=step, b=batches, c=counter: s(b[next(c) % len(b)]), device, repeat
                    )
                    times[k].append(t)
        base = min(times["plain AE"])
        for k in VARIANTS:
            med = min(times[k])
            rows.append(
                f"| {d:>3} -> {hidden:<3} | {k:<28} | {1e3 * med:8.2f} | {med / base:6.2f}x |"
            )
    return rows


def jacobian_loops(args: argparse.Namespace, device: torch.device) -> list[str]:
    rows = []
    for d, hidden, batch in [(64, 64, 64), (784, 256, 16)]:
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid()).to(device)
        x = digits(d, device)[:batch]

        def ours(enc: nn.Module = enc, x: torch.Tensor = x) -> None:
            layer_jacobian(enc, x)

        def per_sample_loop(
            enc: nn.Module = enc, x: torch.Tensor = x, batch: int = batch, hidden: int = hidden
        ) -> None:
            out = []
            for b in range(batch):
                xb = x[b].detach().requires_grad_(True)
                hb = enc(xb)
                out.append(
                    torch.stack(
                        [
                            torch.autograd.grad(hb[j], xb, retain_graph=True)[0]
                            for j in range(hidden)
                        ]
                    )
                )
            torch.stack(out)

        def batch_sum_loop(enc: nn.Module = enc, x: torch.Tensor = x, hidden: int = hidden) -> None:
            xb = x.detach().requires_grad_(True)
            h = enc(xb)
            torch.stack(
                [
                    torch.autograd.grad(h[:, j].sum(), xb, retain_graph=True)[0]
                    for j in range(hidden)
                ],
                dim=1,
            )

        # all three agree
        ref = layer_jacobian(enc, x)
        xb = x.detach().requires_grad_(True)
        h = enc(xb)
        loop = torch.stack(
            [torch.autograd.grad(h[:, j].sum(), xb, retain_graph=True)[0] for j in range(hidden)], 1
        )
        assert torch.allclose(ref, loop, atol=1e-6), "Jacobians disagree"
        fns = {
            "nncurv layer_jacobian (vmap)": ours,
            "loop: sample x output": per_sample_loop,
            "loop: output, batch-sum": batch_sum_loop,
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():
            time_it(f, device, 1)
        for _ in range(args.rounds):
            for k, f in fns.items():
                times[k].append(time_it(f, device, 1))
        base = min(times["nncurv layer_jacobian (vmap)"])
        for k in fns:
            med = min(times[k])
            rows.append(
                f"| {d:>3} -> {hidden:<3}, B={batch:<3} | {k:<28} | {1e3 * med:9.2f} | "
                f"{med / base:6.1f}x |"
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=20, help="training steps per timing")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CLOCK
    # single-threaded CPU runs: process CPU time, which waiting for other processes does not inflate
    cpu_clock = device.type == "cpu" and args.threads == 1
    CLOCK = time.process_time if cpu_clock else time.perf_counter
    print(
        f"torch {torch.__version__}, device {device}, {args.threads} thread(s), "
        f"{'process CPU time' if cpu_clock else 'wall time'}, batch {args.batch_size}, "
        f"best of {args.rounds} interleaved rounds\n"
    )
    print("Training step of a sigmoid auto-encoder (BCE + Adam), lambda = 0.01")
    print("| dims       | penalty                      | ms/step  | vs AE   |")
    print("|------------|------------------------------|----------|---------|")
    print("\n".join(training_steps(args, device)))
    print("\nExact per-sample encoder Jacobian")
    print("| dims               | method                       | ms        | vs ours |")
    print("|--------------------|------------------------------|-----------|---------|")
    print("\n".join(jacobian_loops(args, device)))


if __name__ == "__main__":
    main()
