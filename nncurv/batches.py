"""How a batch becomes ``(inputs, targets)`` and how the model is called on it.

The default :class:`BatchFormat` understands the batches PyTorch data loaders produce:

* ``(inputs, targets)`` tuples or lists (a one-element tuple means no targets);
* a bare tensor (no targets: the loss is called as ``loss_fn(outputs)``);
* inputs that are themselves tuples (``model(*inputs)``) or dicts (``model(**inputs)``).

:class:`DictBatch` handles HuggingFace-style dict batches, where the model takes keyword
arguments and the targets sit under a key such as ``"labels"``. Subclass :class:`BatchFormat`
for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchFormat", "DictBatch", "move_batch", "first_tensor"]


def first_tensor(obj: Any) -> Tensor | None:
    """Return the first tensor found in a (nested) tuple/list/dict, or ``None``."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def move_batch(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor of a nested batch to ``device``; floating tensors also to ``dtype``.

    Inference-mode tensors are cloned into normal tensors so that autograd can save them.
    """
    if isinstance(obj, Tensor):
        t = obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
        if t.is_inference():
            with torch.inference_mode(False):
                t = t.clone()
        return t
    if isinstance(obj, Mapping):
        return type(obj)({k: move_batch(v, device, dtype) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple):
        return tuple(move_batch(v, device, dtype) for v in obj)
    if isinstance(obj, list):
        return [move_batch(v, device, dtype) for v in obj]
    return obj


class BatchFormat:
    """Split a batch into ``(inputs, targets)``, call the model, count the samples.

    Override any of the four methods for custom batches.

    Example:
        >>> import torch
        >>> fmt = BatchFormat()
        >>> x, y = fmt.split((torch.zeros(4, 3), torch.ones(4)))
        >>> fmt.num_samples(x, y)
        4
    """

    def split(self, batch: Any) -> tuple[Any, Any]:
        """Return ``(inputs, targets)``; ``targets`` is ``None`` for unsupervised batches."""
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1]
            if len(batch) == 1:
                return batch[0], None
            raise ValueError(
                f"a tuple batch must be (inputs, targets) or (inputs,), got {len(batch)} items; "
                "pass batch_format=... to describe other layouts"
            )
        if isinstance(batch, Mapping):
            raise ValueError(
                f"dict batches need batch_format=DictBatch(target_key=...); keys: {list(batch)}"
            )
        raise TypeError(f"cannot interpret a batch of type {type(batch).__name__}")

    def call(self, model: Callable[..., Any], inputs: Any) -> Any:
        """Call the model: ``model(*inputs)`` for tuples, ``model(**inputs)`` for dicts."""
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    def output(self, raw: Any) -> Tensor:
        """Extract the tensor the loss takes from the model's raw output (``.logits`` if any)."""
        if isinstance(raw, Tensor):
            return raw
        if isinstance(raw, Mapping) and "logits" in raw:
            return raw["logits"]
        logits = getattr(raw, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
            return raw[0]
        raise TypeError(
            f"model output of type {type(raw).__name__} is not a tensor; override "
            "BatchFormat.output to extract it"
        )

    def num_samples(self, inputs: Any, targets: Any) -> int:
        """Number of samples: the leading dimension of the first input tensor."""
        t = first_tensor(inputs)
        if t is None or t.ndim == 0:
            raise ValueError("cannot count samples: the inputs hold no tensor with a batch dim")
        return int(t.shape[0])


class DictBatch(BatchFormat):
    """HuggingFace-style dict batches: ``model(**inputs)`` with targets under ``target_key``.

    Args:
        target_key: Key of the targets (removed from the model's keyword arguments).
        input_keys: Keys passed to the model (default: every key but ``target_key``).

    Example:
        >>> import torch
        >>> fmt = DictBatch(target_key="labels")
        >>> x, y = fmt.split({"input_ids": torch.zeros(2, 5), "labels": torch.ones(2)})
        >>> sorted(x), y.shape
        (['input_ids'], torch.Size([2]))
    """

    def __init__(self, target_key: str = "labels", input_keys: Sequence[str] | None = None):
        self.target_key = target_key
        self.input_keys = None if input_keys is None else list(input_keys)

    def split(self, batch: Any) -> tuple[Any, Any]:
        """Return ``(dict of model kwargs, batch[target_key])``."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"DictBatch expects dict batches, got {type(batch).__name__}")
        if self.target_key not in batch:
            raise ValueError(f"target_key {self.target_key!r} not in batch keys {list(batch)}")
        keys = self.input_keys or [k for k in batch if k != self.target_key]
        return {k: batch[k] for k in keys}, batch[self.target_key]
