"""Independent dense references built with torch.func on flattened parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nncurv import CurvatureProblem


def _split(problem: CurvatureProblem, flat: Tensor) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name in problem.param_names:
        shape = problem.shapes[name]
        out[name] = flat[offset : offset + shape.numel()].reshape(shape)
        offset += shape.numel()
    return out


def _flat0(problem: CurvatureProblem) -> Tensor:
    return torch.cat([problem.params[n].reshape(-1) for n in problem.param_names])


def _call(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers()), **params}
    state = {k: v.detach() if k not in params else v for k, v in state.items()}
    return functional_call(model, state, (x,))


def _eval(model: nn.Module) -> None:
    """Eval mode, except transformer layers: their eval fast path (a fused kernel) gives wrong
    second derivatives under torch.func transforms; with dropout 0 train mode is the same map."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            m.train()


def dense_hessian(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, problem: CurvatureProblem
) -> Tensor:
    """``torch.func.hessian`` of the loss of the whole data set as one batch (model in eval)."""
    was = model.training
    _eval(model)
    try:

        def f(flat: Tensor) -> Tensor:
            return loss_fn(_call(model, _split(problem, flat), X), y)

        with sdpa_kernel([SDPBackend.MATH]):
            if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
                # torch 2.13: torch.func.hessian / jacrev(jacrev) of attention layers is off by
                # 5-8 % (checked against central finite differences); plain double backward
                # is right, so attention models use torch.autograd.functional.hessian
                return torch.autograd.functional.hessian(f, _flat0(problem))
            return torch.func.hessian(f)(_flat0(problem))
    finally:
        model.train(was)


def dense_ggn(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, problem: CurvatureProblem
) -> Tensor:
    """``J^T H_out J`` from ``jacrev`` and ``torch.func.hessian`` of the loss in the outputs."""
    was = model.training
    _eval(model)
    try:
        flat = _flat0(problem)
        ctx = sdpa_kernel([SDPBackend.MATH])
        ctx.__enter__()
        out = _call(model, _split(problem, flat), X).detach()
        J = torch.func.jacrev(lambda f: _call(model, _split(problem, f), X))(flat)
        J = J.reshape(out.numel(), -1)
        H_out = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        ctx.__exit__(None, None, None)
        return J.T @ H_out @ J
    finally:
        model.train(was)
