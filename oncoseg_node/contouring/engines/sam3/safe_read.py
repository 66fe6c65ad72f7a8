"""Reading pickled checkpoints (``.pt``, ``.ckpt``) without ever running code they carry.

A pickle can name any importable callable and have it called while it is
read (``os.system``, ``builtins.exec``, a class's constructor). The reader
here first lists every global the file names, without unpickling it; any
global outside PyTorch's own tensor allow-list and the plain-data holders
below refuses the file, naming it, before anything is read. The file is then
read by ``torch.load(weights_only=True)``, PyTorch's restricted unpickler,
as a second line of defence.

PyTorch Lightning keeps a checkpoint's ``hyper_parameters`` in its
``AttributeDict`` (a ``dict`` subclass that only adds attribute access): the
allow-list reads it, under each name Lightning has defined it, as a plain
``dict``. Lightning itself is never imported. Containers that need their own
code to be rebuilt (``omegaconf``'s ``DictConfig``, ``argparse.Namespace``,
``pathlib`` paths) are refused by name like any other callable.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from oncoseg_node.errors import EngineError

# Plain-data dict subclasses, read as ``dict``: every module path Lightning has defined
# its AttributeDict under (the class's own ``__module__`` is what a pickle names).
PLAIN_DICTS = (
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)
SAFE_GLOBALS: list[Any] = [(dict, name) for name in PLAIN_DICTS]


def unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle in ``path`` names beyond PyTorch's allow-list (nothing is run)."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def read_pickled(path: Path) -> Any:
    """The object pickled in ``path``: tensors, plain containers and numbers only.

    EngineError naming the file and the globals when the file would call any
    other code (nothing of it is run), or when it cannot be read at all.
    """
    path = Path(path)
    try:
        named = unsafe_globals(path)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            EOFError) as exc:
        raise EngineError(f"{path}: unreadable as a PyTorch checkpoint ({exc})") from exc
    refused = sorted(set(named) - set(PLAIN_DICTS))
    if refused:
        raise EngineError(
            f"{path}: refused, the checkpoint would call code to be read: "
            f"{', '.join(refused)} (only tensors, plain containers, numbers and "
            "Lightning's AttributeDict are read)")
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise EngineError(f"{path}: unreadable ({exc})") from exc
        except pickle.UnpicklingError as exc:  # the restricted unpickler said no
            raise EngineError(f"{path}: refused by the restricted reader ({exc})") from exc
        try:  # the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise EngineError(f"{path}: refused by the restricted reader ({exc})") from exc
        except (RuntimeError, OSError, EOFError) as exc:
            raise EngineError(f"{path}: unreadable ({exc})") from exc
