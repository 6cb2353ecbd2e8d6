"""Shared fixtures: devices, float64 defaults and helpers."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _device_params() -> list:
    params = [pytest.param("cpu", id="cpu")]
    params.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
            ],
        )
    )
    return params


@pytest.fixture(params=_device_params())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every available device: CPU always, CUDA when present (marked ``cuda``)."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Small products are dispatch-bound: one thread avoids contention on shared CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0, what: str = ""
) -> None:
    """allclose with a report of the worst mismatch."""
    actual = actual.detach().to(expected.dtype).cpu()
    expected = expected.detach().cpu()
    diff = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    if not bool((diff <= tol).all()):
        i = int((diff - tol).argmax())
        raise AssertionError(
            f"{what} mismatch: max abs diff {float(diff.max()):.3e}, worst at flat index {i}: "
            f"{float(actual.reshape(-1)[i]):.6e} vs {float(expected.reshape(-1)[i]):.6e} "
            f"(rtol={rtol}, atol={atol}); rel. Frobenius error "
            f"{float(diff.norm() / expected.norm().clamp_min(1e-300)):.3e}"
        )
