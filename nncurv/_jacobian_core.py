r"""Per-sample functional view of a layer, shared by the Jacobian and contractive modules.

A model and a batch become a :class:`~nncurv._jacobian_operator.PerSampleJacobian`: per sample
:math:`b`, the map
:math:`z_b \mapsto g(z_b)` from the flattened network input (or the layer's own input) to the
flattened output of the chosen layer, evaluated with :func:`torch.func.functional_call` and batched
over samples with :func:`torch.vmap`. Its products :math:`J_b V_b` and :math:`J_b^\top U_b` are
what every norm estimator consumes; the estimators know nothing of models.

Private module: the public entry points live in :mod:`nncurv.jacobians` and
:mod:`nncurv.contractive`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nncurv._jacobian_operator import (
    DenseBatchedJacobian,
    JacobianMode,
    PerSampleJacobian,
    _BatchedAutogradJacobian,
    _FunctionalJacobian,
)
from nncurv._state import apply_module_policy, untouched

__all__ = [
    "Wrt",
    "JacobianMode",
    "Vectorize",
    "PerSampleJacobian",
    "DenseBatchedJacobian",
    "per_sample_jacobian",
    "check_input",
    "resolve_layer",
    "new_generator",
]

Wrt = Literal["input", "layer_input"]
Vectorize = Literal["vmap", "batch"]


class _Stop(Exception):
    """Raised by the temporary forward hook once the layer's output (or input) is captured."""


# ---------------------------------------------------------------------------------------- checks
def check_input(x: Any, name: str = "x") -> Tensor:
    """Validate a batch of network inputs (tensor, floating, non-empty batch dimension)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.dtype.is_floating_point):
        raise TypeError(
            f"{name} must be a floating-point tensor so that it can be differentiated, got "
            f"dtype {x.dtype}; cast it (e.g. {name}.float()) or, for token ids feeding an "
            f"embedding, pass layer=... with wrt='layer_input' after the embedding"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    return x.clone() if x.is_inference() else x


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for ``layer`` (a name, a submodule, or ``None``: the model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer is None:
        return "", model
    named = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in named:
            valid = ", ".join(repr(n) for n in named if n) or "(none: the model has no submodules)"
            raise ValueError(f"unknown layer {layer!r}; valid layer names are: {valid}")
        return layer, named[layer]
    if isinstance(layer, nn.Module):
        for n, m in named.items():
            if m is layer:
                return n, m
        raise ValueError(
            f"layer {type(layer).__name__} is not a submodule of the model "
            f"({type(model).__name__}); pass one of its named_modules() or its name"
        )
    raise TypeError(f"layer must be a name, a module or None, got {type(layer).__name__}")


def new_generator(device: torch.device, generator: torch.Generator | None, seed: int) -> Any:
    """Return ``generator`` (checked to live on ``device``) or a fresh one seeded with ``seed``."""
    if generator is None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator lives on {generator.device} but the tensors on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return generator


# --------------------------------------------------------------------------- model plumbing
@contextlib.contextmanager
def _temporary_hook(module: nn.Module, hook: Callable[..., Any], *, pre: bool) -> Iterator[None]:
    handle = (
        module.register_forward_pre_hook(hook, with_kwargs=True)
        if pre
        else module.register_forward_hook(hook)
    )
    try:
        yield
    finally:
        handle.remove()


def _first_tensor(out: Any, where: str) -> Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the output of {where} is not a tensor (got {type(out).__name__})")
    if not out.dtype.is_floating_point:
        raise TypeError(f"the output of {where} has dtype {out.dtype}; it cannot be differentiated")
    return out


def _one(out: Tensor, where: str) -> Tensor:
    if out.ndim < 1 or out.shape[0] != 1:
        raise ValueError(
            f"the output of {where} has shape {tuple(out.shape)} for a batch of one sample; "
            "per-sample Jacobians need the batch dimension first (use batch_first=True)"
        )
    return out[0]


def _state(module: nn.Module, keep_graph: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {n: (p if keep_graph else p.detach()) for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return params, buffers


def _run_until(
    model: nn.Module,
    state: tuple[dict[str, Tensor], dict[str, Tensor]],
    layer: nn.Module,
    x: Tensor,
    where: str,
    *,
    pre: bool,
) -> Any:
    """Run ``model`` functionally on ``x`` until ``layer`` and return what its hook saw.

    With ``pre`` the ``(args, kwargs)`` the layer is called with, else its output; the forward
    pass stops there.
    """
    holder: list[Any] = []

    def hook(_m: nn.Module, *seen: Any) -> None:
        holder.append(seen if pre else seen[-1])
        raise _Stop

    with _temporary_hook(layer, hook, pre=pre):
        try:
            functional_call(model, state, (x,))
        except _Stop:
            pass
    if not holder:
        raise ValueError(f"{where} was not called during the model's forward pass")
    return holder[0]


def _output_fn(
    model: nn.Module, layer: nn.Module, where: str, keep_graph: bool
) -> Callable[[Tensor], Tensor]:
    """Batched function ``x -> output of layer`` (stops the forward pass at the layer)."""
    state = _state(model, keep_graph)
    if layer is model:

        def run_model(x: Tensor) -> Tensor:
            return _first_tensor(functional_call(model, state, (x,)), where)

        return run_model

    def run_layer(x: Tensor) -> Tensor:
        return _first_tensor(_run_until(model, state, layer, x, where, pre=False), where)

    return run_layer


def _capture_layer_args(
    model: nn.Module, layer: nn.Module, x: Tensor, where: str, keep_graph: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return _run_until(model, _state(model, keep_graph), layer, x, where, pre=True)


@contextlib.contextmanager
def per_sample_jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    layer: str | nn.Module | None = None,
    wrt: Wrt = "input",
    keep_graph: bool | None = None,
    vectorize: Vectorize = "vmap",
) -> Iterator[PerSampleJacobian]:
    """Yield the per-sample Jacobians of ``layer``'s output, with the model left untouched.

    Inside the block the model runs with BatchNorm in eval mode and dropout off (per-sample
    quantities of a batch-statistics network are not defined); flags, buffers and the global RNG
    are restored on exit, also on error.

    Args:
        model: The network.
        x: Batch of network inputs, batch dimension first.
        layer: Submodule (name as in ``named_modules()`` or the module); ``None`` is the model.
        wrt: ``"input"``: derivative with respect to the network input ``x``; ``"layer_input"``:
            with respect to the layer's own first positional input (other tensor arguments that
            are the same object, as in self-attention ``attn(h, h, h)``, move with it; different
            ones are held fixed per sample).
        keep_graph: Whether results stay differentiable with respect to the model parameters;
            default: when gradients are enabled and some parameter requires them.
        vectorize: ``"vmap"`` evaluates each sample on its own (per-sample by construction);
            ``"batch"`` runs plain autograd on the whole batch (much less overhead; exact only if
            the model treats samples independently; ``wrt="input"`` only).
    """
    x = check_input(x)
    name, module = resolve_layer(model, layer)
    where = f"layer {name!r} ({type(module).__name__})" if name else f"model {type(model).__name__}"
    if wrt not in ("input", "layer_input"):
        raise ValueError(f"wrt must be 'input' or 'layer_input', got {wrt!r}")
    if vectorize not in ("vmap", "batch"):
        raise ValueError(f"vectorize must be 'vmap' or 'batch', got {vectorize!r}")
    if vectorize == "batch" and wrt != "input":
        raise ValueError("vectorize='batch' supports wrt='input' only")
    if keep_graph is None:
        keep_graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    with (
        untouched(model),
        torch.set_grad_enabled(keep_graph or torch.is_grad_enabled() or vectorize == "batch"),
        sdpa_kernel(SDPBackend.MATH),  # fused attention kernels lack forward-mode AD
    ):
        apply_module_policy(model, batchnorm="eval", dropout="off")
        if vectorize == "batch":
            yield _BatchedAutogradJacobian(
                _output_fn(model, module, where, keep_graph), x, keep_graph
            )
            return
        if wrt == "input" or module is model:
            batched = _output_fn(model, module, where, keep_graph)
            in_shape = tuple(x.shape[1:])
            points = x.reshape(x.shape[0], -1)
            extras: tuple[Tensor, ...] = ()

            def raw(z: Tensor, *ex: Tensor) -> Tensor:
                return _one(batched(z.reshape(1, *in_shape)), where)

        else:
            args, kwargs = _capture_layer_args(model, module, x, where, keep_graph)
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"{where} has no tensor as first positional input")
            z0 = args[0]
            if not z0.dtype.is_floating_point:
                raise TypeError(
                    f"the input of {where} has dtype {z0.dtype} and cannot be differentiated"
                )
            if z0.ndim < 1 or z0.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the input of {where} has shape {tuple(z0.shape)}; expected the batch "
                    f"dimension {x.shape[0]} first"
                )
            lstate = _state(module, keep_graph)
            in_shape = tuple(z0.shape[1:])
            points = z0.reshape(z0.shape[0], -1)
            tied = [a is z0 for a in args]
            batched_others = [
                isinstance(a, Tensor) and a.ndim >= 1 and a.shape[0] == x.shape[0] and not t
                for a, t in zip(args, tied)
            ]
            extras = tuple(a for a, b in zip(args, batched_others) if b)

            def raw(z: Tensor, *ex: Tensor) -> Tensor:
                zb = z.reshape(1, *in_shape)
                it = iter(ex)
                call_args = [
                    zb if t else (next(it).unsqueeze(0) if b else a)
                    for a, t, b in zip(args, tied, batched_others)
                ]
                out = functional_call(module, lstate, tuple(call_args), kwargs)
                return _one(_first_tensor(out, where), where)

        def fn(z: Tensor, *ex: Tensor) -> Tensor:
            return raw(z, *ex).reshape(-1)

        with torch.no_grad():
            out_shape = tuple(raw(points[0], *(e[0] for e in extras)).shape)
        yield _FunctionalJacobian(fn, points, extras, in_shape, out_shape)
