r"""The functional view: model + loss + data as pure functions of a parameter dict.

This is the one place in nncurv that knows about ``torch.func.functional_call``, buffers,
BatchNorm/dropout policies, parameter subsets, data-loader averaging and distributed reduction.
Operators and consumers build on :class:`CurvatureProblem`.

Conventions:
    The user states how ``loss_fn`` reduces over a batch. With ``reduction="mean"`` the loss of
    a batch is a mean over its samples and the data-set loss is the sample-weighted mean
    :math:`\mathcal{L}(\theta) = \sum_b \frac{n_b}{N} \mathcal{L}_b(\theta)` (a short last batch
    counts with its own size); with ``reduction="sum"`` it is :math:`\sum_b \mathcal{L}_b`.
    Under ``torch.distributed`` the sums run over the batches of all ranks.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nncurv._state import BatchNormPolicy, DropoutPolicy, apply_module_policy, untouched
from nncurv.batches import BatchFormat, move_batch

if torch.distributed.is_available() and not torch.distributed.is_initialized():
    # torch.distributed.nn binds ``group=group.WORLD`` as default arguments when it is imported.
    # torch.func.grad imports it (through torch._dynamo) on first use; if that happens after
    # init_process_group, those defaults keep the default group alive past
    # destroy_process_group, and its gloo threads can abort the process at exit ("terminate
    # called without an active exception"). Imported here, before any group exists, the
    # defaults stay empty placeholders.
    import torch.distributed.nn  # noqa: F401

__all__ = ["CurvatureProblem", "Batch", "ParamSelection", "Reduction"]

Reduction = Literal["mean", "sum"]
ParamSelection = Union[
    None,
    str,
    nn.Module,
    nn.Parameter,
    Callable[[str, nn.Parameter], bool],
    Sequence[Union[str, nn.Module, nn.Parameter]],
]


@dataclass(frozen=True)
class Batch:
    """One batch on the parameters' device.

    Attributes:
        inputs: What the model is called with.
        targets: What the loss compares with (``None`` when unsupervised).
        size: Number of samples.
        weight: Factor of this batch's loss in the data-set loss (``size/N`` or ``1``).
        index: Position of the batch in the data.
    """

    inputs: Any
    targets: Any
    size: int
    weight: float
    index: int


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, (Tensor, Mapping)):
        return True
    if isinstance(data, list) and data and all(isinstance(x, Mapping) for x in data):
        return False  # a list of dict batches (one batch with dict parts is a tuple)
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(x, (Tensor, Mapping)) for x in data)
    return False


def check_reduction(loss_fn: Any, reduction: str, owner: str = "the problem") -> None:
    """Raise ``ValueError`` when a loss module's own ``reduction`` is not the declared one."""
    declared = getattr(loss_fn, "reduction", None)
    if declared in ("mean", "sum") and declared != reduction:
        raise ValueError(
            f"loss_fn reduces with reduction={declared!r} but {owner} was given "
            f"reduction={reduction!r}; pass reduction={declared!r}"
        )


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The generators a data loader draws its shuffling (and worker seeds) from."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def _dist_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / Lightning wrappers keep the real module in .module
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _select(
    model: nn.Module, params: ParamSelection, all_params: dict[str, nn.Parameter] | None = None
) -> list[str]:
    if all_params is None:
        all_params = dict(model.named_parameters())
    named = [(n, p) for n, p in all_params.items() if p.requires_grad]
    if not named:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    if params is None:
        return [n for n, _ in named]
    items: Sequence[Any]
    if isinstance(params, (str, nn.Module, Tensor)) or callable(params):
        items = [params]
    elif isinstance(params, Sequence):
        items = params
    else:
        raise TypeError(
            f"params must be a pattern, module, parameter, callable or list, got {params!r}"
        )
    if len(items) == 0:
        raise ValueError("params is an empty selection")
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            hits = {n for n, _ in named if fnmatch.fnmatchcase(n, item) or n == item}
            hits |= {n for n, _ in named if fnmatch.fnmatchcase(n, item + ".*")}
        elif isinstance(item, nn.Module):
            ids = {id(p) for p in item.parameters()}
            hits = {n for n, p in named if id(p) in ids}
        elif isinstance(item, Tensor):
            hits = {n for n, p in named if p is item}
        elif callable(item):
            hits = {n for n, p in named if item(n, p)}
        else:
            raise TypeError(f"cannot select parameters with {item!r}")
        if not hits:
            avail = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise ValueError(
                f"params selection {item!r} matches no trainable parameter; available: {avail}"
            )
        chosen |= hits
    return [n for n, _ in named if n in chosen]


class CurvatureProblem:
    r"""Model, loss and data seen as pure functions of the selected parameters.

    The user's module is never mutated: parameters are read (detached, not copied), buffers are
    copied once, and every evaluation runs inside :func:`nncurv._state.untouched`, which restores
    all train/eval flags and the global RNG state afterwards, also when it raises.

    Args:
        model: The network (``DistributedDataParallel``/``DataParallel`` wrappers are unwrapped).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (``loss_fn(outputs)`` when batches carry
            no targets), reducing over the batch as ``reduction`` says.
        data: One batch (a tensor, an ``(inputs, targets)`` tuple or list, or a dict) or any
            iterable of batches such as a ``DataLoader`` or a list of batches. Iterables are
            re-read on every pass, inside a forked RNG, with the loader's own generators (a
            ``DataLoader(generator=...)`` or its sampler's) restored after each pass, so that
            shuffling or augmentation are the same on every pass and no RNG state changes. A
            one-shot iterator (a generator) is read once and its batches are kept.
        reduction: How ``loss_fn`` reduces over samples: ``"mean"`` or ``"sum"``. A loss
            module with a ``reduction`` attribute (``nn.CrossEntropyLoss(reduction="sum")``)
            must agree: a mismatch is a ``ValueError``.
        params: Which parameters the curvature is taken over: ``None`` (all trainable), a name
            or glob pattern (``"fc1.*"``; a module name selects its parameters), a module, a
            parameter, a predicate ``(name, param) -> bool``, or a list of these.
        batchnorm: ``"eval"`` (running statistics, default) or ``"batch"`` (statistics of the
            batch, running statistics left untouched).
        dropout: ``"off"`` (default) or ``"on"``: dropout active with a mask fixed per batch
            (drawn from ``seed``), so that the operator stays a deterministic linear map.
        batch_format: How a batch is split and the model called (:class:`BatchFormat`).
        cache_batches: Keep the batches on the device after the first pass instead of
            re-reading the iterable.
        distributed: Reduce over all ranks of the default process group; ``None`` means "when
            ``torch.distributed`` is initialised".
        seed: Seed of the dropout masks (``dropout="on"``).
        check_loss: Evaluate the loss on the first batch at construction to check that it is
            a scalar before any other work (one forward pass). With ``False`` the check happens
            at the first evaluation instead (for callers that rebuild a problem they checked).

    Example:
        >>> import torch
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> problem = CurvatureProblem(model, torch.nn.MSELoss(), (X, y))
        >>> problem.num_params, problem.num_samples
        (4, 8)
        >>> loss = problem.loss()
        >>> bool(torch.isclose(loss, torch.nn.functional.mse_loss(model(X), y)))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        reduction: Reduction = "mean",
        params: ParamSelection = None,
        batchnorm: BatchNormPolicy = "eval",
        dropout: DropoutPolicy = "off",
        batch_format: BatchFormat | None = None,
        cache_batches: bool = False,
        distributed: bool | None = None,
        seed: int = 0,
        check_loss: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        check_reduction(loss_fn, reduction)
        if batchnorm not in ("eval", "batch"):
            raise ValueError(f"batchnorm must be 'eval' or 'batch', got {batchnorm!r}")
        if dropout not in ("off", "on"):
            raise ValueError(f"dropout must be 'off' or 'on', got {dropout!r}")
        if batch_format is not None and not isinstance(batch_format, BatchFormat):
            raise TypeError(f"batch_format must be a BatchFormat, got {batch_format!r}")
        if data is None:
            raise ValueError("data is None; pass a batch or an iterable of batches")
        self.model = _unwrap(model)
        self.loss_fn = loss_fn
        self.reduction: Reduction = reduction
        self.batchnorm: BatchNormPolicy = batchnorm
        self.dropout: DropoutPolicy = dropout
        self.batch_format = batch_format or BatchFormat()
        self.seed = seed
        self._apply_selection(
            params, {n: b.detach().clone() for n, b in self.model.named_buffers()}
        )
        first = self.params[self.param_names[0]]
        self.dtype = first.dtype
        self.device = first.device
        self._check_params()
        self.distributed = _dist_initialized() if distributed is None else bool(distributed)
        if self.distributed and not _dist_initialized():
            raise ValueError("distributed=True but torch.distributed is not initialized")
        self._single = _is_single_batch(data)
        self._data = data
        self._cache: list[tuple[Any, Any, int]] | None = None
        # a one-shot iterator cannot be re-read: its batches are kept from the first pass
        self._cache_batches = cache_batches or (not self._single and isinstance(data, Iterator))
        sizes = self._scan()
        self.batch_sizes = sizes
        local = sum(sizes)
        self.num_samples = int(self.all_reduce(torch.tensor(float(local), device=self.device)))
        if check_loss:
            self._check_loss()

    # ------------------------------------------------------------------ data
    def _raw_batches(self) -> Iterator[tuple[Any, Any, int]]:
        if self._cache is not None:
            yield from self._cache
            return
        source: Iterable[Any] = [self._data] if self._single else self._data
        generators = [] if self._single else _loader_generators(self._data)
        states = [g.get_state() for g in generators]
        try:
            with torch.random.fork_rng(devices=self._cuda_devices()):
                for raw in source:
                    x, y = self.batch_format.split(raw)
                    n = self.batch_format.num_samples(x, y)
                    x = move_batch(x, self.device, self.dtype)
                    y = move_batch(y, self.device, self.dtype) if y is not None else None
                    yield x, y, n
        finally:
            for g, state in zip(generators, states):
                g.set_state(state)

    def _cuda_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _scan(self) -> list[int]:
        if not self._single and not isinstance(self._data, Iterable):
            raise TypeError(
                f"data must be a batch or an iterable of batches, got {type(self._data).__name__}"
            )
        sizes: list[int] = []
        cache: list[tuple[Any, Any, int]] = []
        for x, y, n in self._raw_batches():
            if n == 0:
                raise ValueError(f"batch {len(sizes)} of data is empty")
            sizes.append(n)
            if self._cache_batches or self._single:
                cache.append((x, y, n))
        if not sizes and not self.distributed:
            raise ValueError("data is empty: the iterable yielded no batch")
        if self._cache_batches or self._single:
            self._cache = cache
        return sizes

    def batches(self) -> Generator[Batch, None, None]:
        """Iterate over the batches on the device, each with its weight in the data-set loss."""
        self.check_unchanged()
        for i, (x, y, n) in enumerate(self._raw_batches()):
            w = n / self.num_samples if self.reduction == "mean" else 1.0
            yield Batch(x, y, n, w, i)

    @property
    def num_batches(self) -> int:
        """Number of local batches."""
        return len(self.batch_sizes)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks when distributed (in place); identity otherwise."""
        if self.distributed:
            if t.is_contiguous():
                torch.distributed.all_reduce(t)
            else:  # (NCCL takes contiguous tensors only, e.g. not a matmat's transposed result)
                c = t.contiguous()
                torch.distributed.all_reduce(c)
                t.copy_(c)
        return t

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Context in which the model may be evaluated: flags, RNG and grad mode are guarded.

        Attention runs through the math backend of ``scaled_dot_product_attention``: the fused
        kernels have neither forward-mode nor double-backward derivatives.
        """
        with untouched(self.model), sdpa_kernel([SDPBackend.MATH]):
            apply_module_policy(self.model, batchnorm=self.batchnorm, dropout=self.dropout)
            yield

    def _seed_for(self, batch: Batch) -> None:
        if self.dropout == "on":
            torch.manual_seed(self.seed * 1_000_003 + batch.index)

    def output(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Model output on ``batch`` at ``params`` (selected parameters; others stay fixed).

        Must run inside :meth:`evaluating`.
        """
        self._seed_for(batch)
        state = {**self._fixed, **params}
        raw = self.batch_format.call(
            lambda *a, **k: functional_call(self.model, state, a, k), batch.inputs
        )
        return self.batch_format.output(raw)

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The user's loss of ``outputs`` against the batch targets (not weighted)."""
        if batch.targets is None:
            return self.loss_fn(outputs)
        return self.loss_fn(outputs, batch.targets)

    def batch_loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Weighted loss of one batch, ``weight * loss_fn(model(x), y)``; sums to the data loss.

        Must run inside :meth:`evaluating`.
        """
        value = self.output_loss(self.output(params, batch), batch)
        if not isinstance(value, Tensor) or value.ndim != 0:
            self._raise_not_scalar(value)
        # a single batch (or a summed loss) has weight 1: no extra node in the (double) backward
        return value if batch.weight == 1.0 else value * batch.weight

    def _check_loss(self) -> None:
        it = self.batches()
        batch = next(it, None)
        it.close()  # restores the RNG forked for the data pass before anything else runs
        if batch is None:
            return
        with self.evaluating(), torch.no_grad():
            self.batch_loss(self.params, batch)

    @staticmethod
    def _raise_not_scalar(value: object) -> None:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {shape}; use a reduced loss "
            "(reduction='mean' or 'sum' in the loss)"
        )

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Data-set loss at ``params`` (default: the model's current parameters)."""
        p = self.params if params is None else params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with self.evaluating(), torch.no_grad():
            for batch in self.batches():
                total = total + self.batch_loss(p, batch).to(self.dtype)
        return self.all_reduce(total)

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Data-set loss and its flat gradient at the current parameters."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self.evaluating():
            for batch in self.batches():
                leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
                value = self.batch_loss(leaves, batch)
                gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                grad += self.flatten(dict(zip(leaves, gs)))
                total = total + value.detach()
        if self.distributed:
            packed = self.all_reduce(torch.cat([total.reshape(1), grad]))
            total, grad = packed[0], packed[1:]
        return total, grad

    # ------------------------------------------------------------------ vectors
    def flatten(self, tensors: Mapping[str, Tensor | None]) -> Tensor:
        """Concatenate a dict of per-parameter tensors into one vector (``None`` → zeros)."""
        parts = []
        for n in self.param_names:
            t = tensors.get(n)
            if t is None:
                parts.append(
                    torch.zeros(self.shapes[n].numel(), dtype=self.dtype, device=self.device)
                )
            else:
                parts.append(t.reshape(-1))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or a ``(n, k)`` matrix, columns as vectors) into a dict."""
        # one split into views, then one reshape (a view) per parameter
        chunks = torch.split(vector, self._sizes)
        if vector.ndim == 1:
            return {n: c.reshape(self.shapes[n]) for n, c in zip(self.param_names, chunks)}
        rest = vector.shape[1:]
        return {n: c.reshape(*self.shapes[n], *rest) for n, c in zip(self.param_names, chunks)}

    # ------------------------------------------------------------------ subsets
    def with_params(self, params: ParamSelection) -> CurvatureProblem:
        """The same model, loss and data with another parameter selection (data not re-read)."""
        new = object.__new__(CurvatureProblem)
        new.__dict__.update(self.__dict__)
        names = set(dict(self.model.named_parameters()))
        new._apply_selection(params, {n: b for n, b in self._fixed.items() if n not in names})
        new._versions = self._versions  # the parameters as this problem read them
        new._check_params()
        return new

    def _apply_selection(self, params: ParamSelection, buffers: dict[str, Tensor]) -> None:
        """Set the selected parameters (read, not copied) and the fixed state around them."""
        self._selection = params
        all_params = dict(self.model.named_parameters())
        self.param_names = _select(self.model, params, all_params)
        selected = set(self.param_names)
        self.params: dict[str, Tensor] = {n: all_params[n].detach() for n in self.param_names}
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self._sizes = [self.shapes[n].numel() for n in self.param_names]
        self.num_params = sum(self._sizes)
        self._fixed: dict[str, Tensor] = {
            n: p.detach() for n, p in all_params.items() if n not in selected
        }
        self._fixed.update(buffers)
        # detach() shares the version counter: in-place updates of the model's parameters show
        self._watched = {n: p.detach() for n, p in all_params.items()}
        self._versions = {n: p._version for n, p in self._watched.items()}

    def check_unchanged(self) -> None:
        """Raise ``ValueError`` if a model parameter changed in place since the problem read it.

        An optimizer step or a ``copy_`` changes it. The problem reads the parameters without
        copying them but copies the buffers, so its curvature is that of the model at
        construction; after the parameters change it would silently mix new parameters with old
        buffers (and retained graphs would be invalid). Build a new problem instead. Every pass
        over the data checks this, as do the cached products of the operators.
        """
        for n, p in self._watched.items():
            if p._version != self._versions[n]:
                raise ValueError(
                    f"parameter {n!r} of {type(self.model).__name__} was modified in place "
                    "after this CurvatureProblem read it (e.g. by an optimizer step); build a "
                    "new CurvatureProblem (and operator) for the new parameters"
                )

    def _check_params(self) -> None:
        for n, p in self.params.items():
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"selected parameters must share dtype and device; {n!r} is "
                    f"{p.dtype} on {p.device}, the problem's are {self.dtype} on {self.device}"
                )
            if not p.dtype.is_floating_point:
                raise TypeError(f"parameter {n!r} has non-floating dtype {p.dtype}")

    def blocks(self) -> dict[str, list[str]]:
        """Selected parameter names grouped by the module that owns them (per-layer blocks).

        Example:
            >>> import torch
            >>> from torch.nn import Linear, Sequential, Tanh
            >>> net = Sequential(Linear(2, 3), Tanh(), Linear(3, 1))
            >>> data = (torch.randn(4, 2), torch.randn(4, 1))
            >>> CurvatureProblem(net, torch.nn.MSELoss(), data).blocks()
            {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
        """
        groups: dict[str, list[str]] = {}
        for n in self.param_names:
            owner = n.rsplit(".", 1)[0] if "." in n else ""
            groups.setdefault(owner, []).append(n)
        return groups

    def block_problems(self) -> dict[str, CurvatureProblem]:
        """One problem per block of :meth:`blocks` (for per-layer metrics)."""
        return {name: self.with_params(names) for name, names in self.blocks().items()}

    def __repr__(self) -> str:
        return (
            f"CurvatureProblem(model={type(self.model).__name__}, params={self.num_params}, "
            f"samples={self.num_samples}, batches={self.num_batches}, "
            f"reduction={self.reduction!r}, batchnorm={self.batchnorm!r}, "
            f"distributed={self.distributed})"
        )
