r"""First-layer affine precomputation for grid evaluation along a slice.

Along :math:`\theta + \sum_j c_j d_j` the output of the first layer of a network, when that
layer is affine in its parameters and applied to the raw input (``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``), is affine in the coefficients:

.. math::

    z(c) = L(x;\, W_0, b_0) + \sum_j c_j\, L(x;\, D_j W, D_j b).

The ``k + 1`` layer outputs are computed once per batch; each point then evaluates only the
rest of the network on :math:`z(c)`. This is exact (up to float rounding) and applies only
where it is safe and detectable: an ``nn.Sequential`` (possibly nested as first children)
whose first leaf is one of those layers, called on a tensor with the default batch format,
without hooks or tied parameters, with BatchNorm policy ``"eval"``, dropout ``"off"`` and no
BatchNorm recalibration. Everything else takes the generic path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module_mod

from nncurv.batches import BatchFormat
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["AffinePlan", "affine_plan"]

_AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_IN_PLACE: dict[type, Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.Tensor.tanh_,
    nn.ReLU: torch.Tensor.relu_,
    nn.Sigmoid: torch.Tensor.sigmoid_,
    nn.Identity: lambda t: t,
}
# parameter-free elementwise modules the batched MLP path calls directly on (P, N, H) tensors
_ELEMENTWISE = (
    nn.Identity,
    nn.Tanh,
    nn.ReLU,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Mish,
)


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or getattr(m, "_forward_hooks_with_kwargs", None)
        or getattr(m, "_forward_hooks_always_called", None)
    )


def _global_hooks() -> bool:
    return bool(
        getattr(_module_mod, "_global_forward_hooks", None)
        or getattr(_module_mod, "_global_forward_pre_hooks", None)
    )


@dataclass
class AffinePlan:
    """Where the first affine layer sits and how to run the rest of the network.

    Attributes:
        layer: The first layer (``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``).
        weight: Full name of its weight.
        bias: Full name of its bias (``None`` without bias).
        rest: ``(prefix, module)`` of the remaining modules in execution order; each is called
            with the entries of the state dict under its prefix.
    """

    layer: nn.Module
    weight: str
    bias: str | None
    rest: list[tuple[str, nn.Module]]

    def apply_layer(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The first layer at the given weight and bias (no module state involved)."""
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return self.layer._conv_forward(x, weight, bias)  # type: ignore[operator]

    def first_outputs(
        self,
        problem: CurvatureProblem,
        center: Mapping[str, Tensor],
        dirs: Sequence[Mapping[str, Tensor]],
        batch: Batch,
    ) -> Callable[[Tensor], Tensor] | None:
        """A map from a ``(P, k)`` chunk of coefficients to the first layer's ``(P, ...)`` outputs.

        ``z_0 = L(x; W_0, b_0)`` and ``z_j = L(x; D_j W, D_j b)`` are computed once (``z_j``
        only where direction ``j`` has an entry for the layer), then one matrix product
        ``[1, c] @ [z_0; z_1; …]`` per chunk (with ``k = 2`` on the digits MLP about 2.3x faster
        on CPU than copying ``z_0`` and adding ``c_j z_j`` in place: the output is written
        once). ``None`` when an output is not finite (e.g. a direction so large that
        ``L(x; D)`` overflows, where ``0 · inf`` would turn the centre into NaN): the caller
        then takes the generic path.
        """
        x = batch.inputs
        fixed = problem._fixed  # the state problem.output uses for unselected entries

        def value(name: str | None) -> Tensor | None:
            if name is None:
                return None
            return center[name] if name in center else fixed.get(name)

        z0 = self.apply_layer(x, value(self.weight), value(self.bias))  # type: ignore[arg-type]
        zs: list[Tensor] = []
        cols: list[int] = []
        for j, d in enumerate(dirs):
            dw = d.get(self.weight)
            db = d.get(self.bias) if self.bias is not None else None
            if dw is None and db is None:
                continue  # this direction leaves the layer alone
            if dw is None:
                dw = torch.zeros_like(value(self.weight))  # type: ignore[arg-type]
            zs.append(self.apply_layer(x, dw, db))
            cols.append(j)
        if not all(bool(torch.isfinite(z).all()) for z in [z0, *zs]):
            return None  # one check per batch
        stacked = torch.stack([z0, *zs]).reshape(1 + len(zs), -1)

        def f(C: Tensor) -> Tensor:
            coef = torch.cat([torch.ones_like(C[:, :1]), C[:, cols]], dim=1).to(z0.dtype)
            return (coef @ stacked).view(C.shape[0], *z0.shape)

        return f

    @property
    def batched_mlp(self) -> bool:
        """Whether the rest is ``nn.Linear`` layers and parameter-free elementwise modules only.

        Then a chunk of points runs through it as batched matrix products with the bias fused
        (``torch.baddbmm``) instead of a vmapped ``functional_call``: exact, and on CPU it
        avoids the separate bias pass and the vmap bookkeeping of every layer.
        """
        for _, m in self.rest:
            if _has_hooks(m):
                return False
            if type(m) is nn.Linear:
                continue
            if type(m) not in _ELEMENTWISE or any(True for _ in m.parameters()):
                return False
            if any(True for _ in m.buffers()) or any(True for _ in m.children()):
                return False
        return True

    def rest_outputs_batched(
        self,
        problem: CurvatureProblem,
        center: Mapping[str, Tensor],
        dirs: Sequence[Mapping[str, Tensor]],
        C: Tensor,
        z: Tensor,
    ) -> Tensor:
        """The rest of an MLP (see :attr:`batched_mlp`) for a chunk of points at once.

        Args:
            problem: The problem (its fixed state holds the unselected parameters).
            center: Parameters of the origin (selected ones).
            dirs: The directions.
            C: ``(P, k)`` coefficients.
            z: ``(P, N, H)`` first-layer outputs of the points.

        Returns:
            ``(P, N, out)`` outputs, row ``i`` at ``center + sum_j C[i, j] dirs[j]``.
        """
        fixed = problem._fixed
        P = C.shape[0]

        def at_points(name: str) -> Tensor:
            base = center[name] if name in center else fixed[name]
            ones = (1,) * base.dim()
            out = base.unsqueeze(0).repeat(P, *ones)
            for j, d in enumerate(dirs):
                if name in d:
                    out.addcmul_(C[:, j].to(base.dtype).view(-1, *ones), d[name])
            return out

        h = z  # (z is the caller's: not modified in place)
        for prefix, m in self.rest:
            if type(m) is nn.Linear:
                W = at_points(prefix + "weight").transpose(1, 2)
                if m.bias is None:
                    h = torch.bmm(h, W)
                else:
                    h = torch.baddbmm(at_points(prefix + "bias").unsqueeze(1), h, W)
            elif h is not z and type(m) in _IN_PLACE:
                h = _IN_PLACE[type(m)](h)  # an intermediate of this function only
            elif h is z and getattr(m, "inplace", False):
                h = m(h.clone())  # an ``inplace=True`` module must not overwrite the caller's z
            else:
                h = m(h)
        return h

    def rest_output(
        self, problem: CurvatureProblem, state: Mapping[str, Tensor], z: Tensor
    ) -> Tensor:
        """The rest of the network on the first layer's output ``z`` at ``state``."""
        h = z
        for prefix, m in self.rest:
            n = len(prefix)
            sub = {k[n:]: v for k, v in state.items() if k.startswith(prefix)}
            h = functional_call(m, sub, (h,))
        return problem.batch_format.output(h)


def affine_plan(problem: CurvatureProblem) -> AffinePlan | None:
    """The first-layer plan for ``problem``, or ``None`` when the model does not qualify.

    Batch-level conditions (the inputs must be a single tensor) are checked by the caller.
    """
    model = problem.model
    if problem.batchnorm != "eval" or problem.dropout != "off":
        return None
    if type(problem.batch_format) is not BatchFormat or _global_hooks():
        return None
    # tied parameters or buffers make the per-submodule state ambiguous
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    ) or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers())):
        return None
    chain: list[tuple[str, nn.Sequential]] = []
    m: nn.Module = model
    prefix = ""
    while type(m) is nn.Sequential:
        children = list(m._modules.items())
        if not children or any(c is None for _, c in children) or _has_hooks(m):
            return None
        chain.append((prefix, m))
        name, first = children[0]
        prefix = f"{prefix}{name}."
        m = first  # type: ignore[assignment]
    if type(m) not in _AFFINE_TYPES or _has_hooks(m):
        return None
    if any(True for _ in m.children()) or set(dict(m.named_parameters())) - {"weight", "bias"}:
        return None
    rest: list[tuple[str, nn.Module]] = []
    for pre, seq in reversed(chain):
        for name, child in list(seq._modules.items())[1:]:
            rest.append((f"{pre}{name}.", child))  # type: ignore[arg-type]
    bias = f"{prefix}bias" if m.bias is not None else None  # type: ignore[union-attr]
    return AffinePlan(layer=m, weight=f"{prefix}weight", bias=bias, rest=rest)
