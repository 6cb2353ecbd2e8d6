"""Shared pieces of the benchmarks: models of the sizes the issues name, timing and memory."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def mlp() -> nn.Module:
    """~21.7k parameters, 64 inputs (digits-sized), 10 outputs."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 96), nn.Tanh(), nn.Linear(96, 10)
    )


class SmallCNN(nn.Module):
    """~21.6k parameters on 1×16×16 inputs; optional BatchNorm."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (BasicBlock ×[2,2,2,2], widths 64–512) for 32×32 inputs, ~11.2M params."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_many(
    fns: dict[str, Callable[[], object]],
    repeat: int = 5,
    warmup: int = 1,
    min_sample_seconds: float = 0.0,
) -> dict[str, float]:
    """Median wall time of each function, measured round-robin so that all share the same
    machine conditions (side by side, not one after the other).

    With ``min_sample_seconds > 0`` a function faster than that runs several times in a row per
    sample (the mean of those calls is one sample, as ``timeit`` does), so that a millisecond
    call is not timed right after a different, larger one alone (cache effects of the
    neighbour otherwise dominate).
    """
    inner: dict[str, int] = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        per_call = (time.perf_counter() - t0) / max(warmup, 1)
        inner[k] = max(1, min(50, int(min_sample_seconds / max(per_call, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / inner[k])
    return {k: statistics.median(v) for k, v in times.items()}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (bytes) that ``fn`` adds: CUDA allocator peak, or the process' RSS peak on CPU.

    On CPU the RSS high-water mark is reset through ``/proc/self/clear_refs`` (Linux); the value
    is the increase of the peak over the resident size before the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status("VmRSS:")
    fn()
    return float(max(_status("VmHWM:") - base, 0))


def threads() -> None:
    torch.set_num_threads(int(os.environ.get("NNCURV_BENCH_THREADS", os.cpu_count() or 1)))
