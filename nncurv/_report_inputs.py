"""Resolving what ``nncurv report`` is given: import paths, checkpoint, loss, data.

Every failure becomes one :class:`ReportInputError` with a message that names the offending
value; the command line prints it and exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from nncurv.problem import _is_single_batch

__all__ = [
    "ReportInputError",
    "import_object",
    "load_module",
    "resolve_loss",
    "resolve_data",
    "check_out_dir",
    "LimitedBatches",
]


class ReportInputError(ValueError):
    """A bad input of :func:`nncurv.report.build_report` (path, import, checkpoint, loss, data)."""


def import_object(spec: str, what: str) -> Any:
    """Import ``"pkg.mod:attr"`` (or ``"path/to/file.py:attr"``); dotted attributes allowed.

    The current directory is put on ``sys.path`` first (as ``python -m`` does), so that
    ``examples.digits:DigitsClassifier`` works from a project root with the console script.

    Args:
        spec: The import path.
        what: What it is, for error messages (``"--module"``).

    Returns:
        The object.

    Raises:
        ReportInputError: Malformed path, failing import, missing attribute.
    """
    if (
        not isinstance(spec, str)
        or spec.count(":") != 1
        or spec.startswith(":")
        or spec.endswith(":")
    ):
        raise ReportInputError(
            f"{what} must look like 'package.module:Name' (or 'file.py:Name'), got {spec!r}"
        )
    mod_name, attr = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ReportInputError(f"{what}: file {mod_name!r} does not exist")
            name = f"_nncurv_user_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ReportInputError(f"{what}: cannot import file {mod_name!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ReportInputError:
        raise
    except Exception as err:  # any failure inside the user's module is reported the same way
        raise ReportInputError(
            f"{what}: importing {mod_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ReportInputError(f"{what}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_module(cls: Any, ckpt: str | os.PathLike[str], device: str) -> nn.Module:
    """``cls.load_from_checkpoint(ckpt)`` with one clear error per way it can go wrong.

    Args:
        cls: A ``LightningModule`` subclass.
        ckpt: Path of the checkpoint.
        device: ``map_location``.

    Returns:
        The module, in eval mode.

    Raises:
        ReportInputError: Lightning missing, not a LightningModule, no such file, a checkpoint
            that cannot be read or does not match the module.
    """
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ReportInputError(
            "nncurv report needs pytorch-lightning to load checkpoints: "
            "pip install 'nncurv[lightning]'"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ReportInputError(
            f"--module must name a pytorch_lightning.LightningModule subclass, got {cls!r}"
        )
    path = Path(ckpt)
    if not path.exists():
        raise ReportInputError(f"--ckpt: checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise ReportInputError(f"--ckpt: {str(path)!r} is not a file")
    try:
        model = cls.load_from_checkpoint(str(path), map_location=device)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        text = str(err).strip().splitlines()
        head = " ".join(text[:3])[:600] if text else type(err).__name__
        if "state_dict" in str(err) or "size mismatch" in str(err) or "Missing key" in str(err):
            raise ReportInputError(
                f"--ckpt: checkpoint {str(path)!r} does not match {cls.__name__}: {head}"
            ) from err
        raise ReportInputError(
            f"--ckpt: loading {str(path)!r} into {cls.__name__} failed: "
            f"{type(err).__name__}: {head}"
        ) from err
    except Exception as err:  # unpickling errors, truncated files, ...
        raise ReportInputError(
            f"--ckpt: {str(path)!r} is not a readable Lightning checkpoint: "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from err
    model.eval()
    return model


def resolve_loss(model: nn.Module, loss: Any) -> Callable[..., Any]:
    """Resolve the loss: ``loss`` if given, else the module's ``loss_fn`` attribute.

    ``loss`` may be a callable or an import path; classes are instantiated without arguments.

    Args:
        model: The loaded module.
        loss: ``None``, a callable or an import path.

    Returns:
        ``loss_fn(outputs, targets) -> scalar``.

    Raises:
        ReportInputError: No loss found, or it cannot be built.
    """
    if loss is None:
        fn = getattr(model, "loss_fn", None)
        if fn is None or not callable(fn):
            raise ReportInputError(
                f"{type(model).__name__} has no callable `loss_fn` attribute; give the loss "
                "with --loss (e.g. --loss torch.nn:CrossEntropyLoss) or set "
                "`self.loss_fn = ...` in the LightningModule's __init__"
            )
        return fn  # type: ignore[no-any-return]
    if isinstance(loss, str):
        loss = import_object(loss, "--loss")
    if isinstance(loss, type):
        try:
            loss = loss()
        except Exception as err:
            raise ReportInputError(
                f"--loss: {loss.__name__}() cannot be built without arguments: {err}"
            ) from err
    if not callable(loss):
        raise ReportInputError(f"--loss must be callable, got {loss!r}")
    return loss  # type: ignore[no-any-return]


class LimitedBatches:
    """The first ``n`` batches of a re-iterable data source (re-iterable itself)."""

    def __init__(self, data: Iterable[Any], n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)


def resolve_data(data: Any, kwargs: dict[str, Any] | None, max_batches: int | None) -> Any:
    """Call the data function (an import path or a callable) and limit the batches.

    Args:
        data: ``"pkg.mod:make_loader"``, a callable returning the data, or the data itself.
        kwargs: Keyword arguments for the data function.
        max_batches: Keep only the first batches.

    Returns:
        A batch or a re-iterable of batches.

    Raises:
        ReportInputError: Import or call failure, or ``None`` returned.
    """
    if isinstance(data, str):
        data = import_object(data, "--data")
        if not callable(data):
            raise ReportInputError(f"--data must name a function returning a loader, got {data!r}")
    if callable(data) and not isinstance(data, Iterable):
        try:
            data = data(**(kwargs or {}))
        except Exception as err:
            raise ReportInputError(
                f"--data: calling {getattr(data, '__name__', data)!r} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
    elif kwargs:
        raise ReportInputError("--data-kwargs given but --data is not a function")
    if data is None:
        raise ReportInputError("--data: the data function returned None")
    if max_batches is not None:
        if max_batches < 1:
            raise ReportInputError(f"--max-batches must be positive, got {max_batches!r}")
        if isinstance(data, (tuple, list)) and not _is_single_batch(data):
            data = list(data)[:max_batches]  # a sequence of batches
        elif isinstance(data, Iterable) and not isinstance(data, (tuple, list, dict)):
            data = LimitedBatches(data, max_batches)
    return data


def check_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create the output folder (parents too) or explain why it cannot be.

    Args:
        out: The folder.

    Returns:
        Its path.

    Raises:
        ReportInputError: It is a file or cannot be created/written.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ReportInputError(f"--out: {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportInputError(f"--out: cannot create folder {str(path)!r}: {err}") from err
    if not os.access(path, os.W_OK):
        raise ReportInputError(f"--out: folder {str(path)!r} is not writable")
    return path
