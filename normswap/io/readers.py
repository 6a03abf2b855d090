"""Open any checkpoint the same way: a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` pickle, or a
HuggingFace model folder (single or sharded safetensors, or ``pytorch_model.bin``).

A :class:`Checkpoint` lists its tensors (name -> dtype and shape) without reading them, hands out one
tensor at a time, and carries the normswap record of a converted checkpoint when it has one. Pickles are
read only with ``torch.load(weights_only=True)``: a file that would import or call code is refused.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from .safetensors_file import SafetensorsFile

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# HF folder weight files, in the order transformers prefers them
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# where training scripts nest the state dict inside a pickle (timm, Lightning, plain loops)
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
RECORD_KEY = "normswap"


@dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of a checkpoint tensor, known without reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint(ABC):
    """Tensors of a checkpoint by name, read one at a time. Open one with :func:`open_checkpoint`.

    Example:
        >>> with open_checkpoint("model.safetensors") as ckpt:  # doctest: +SKIP
        ...     print(len(ckpt.tensors), ckpt.record)
    """

    def __init__(self, path: pathlib.Path, tensors: dict[str, TensorInfo], files: list[pathlib.Path],
                 record: dict | None = None, config: dict | None = None) -> None:
        self.path = path
        self.tensors = tensors
        self.files = files
        self.record = record
        self.config = config  # the config.json of an HF folder

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a view of the mapped file where possible: do not modify it)."""

    def release(self, name: str) -> None:
        """Say that tensor ``name`` is no longer needed, so its memory can go back to the OS."""

    def byte_range(self, name: str) -> tuple[pathlib.Path, int] | None:
        """``(file, offset)`` of tensor ``name``'s raw little-endian bytes, when the format stores them so."""
        return None

    def close(self) -> None:
        """Close the files behind the checkpoint."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class SafetensorsCheckpoint(Checkpoint):
    """One safetensors file, or the shards an HF ``model.safetensors.index.json`` lists."""

    def __init__(self, path: pathlib.Path, files: list[pathlib.Path], config: dict | None = None) -> None:
        self._open = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        tensors = {}
        for f in self._open:
            for name, e in f.entries.items():
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {self._where[name].path.name} and "
                                          f"{f.path.name}; the shards are inconsistent")
                self._where[name] = f
                tensors[name] = TensorInfo(e.dtype, e.shape)
        record = _record_from_metadata(path, self._open[0].metadata) if len(files) == 1 else None
        if config is not None and RECORD_KEY in config:
            record = config[RECORD_KEY]
        super().__init__(path, tensors, files, record, config)

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].tensor(name)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def byte_range(self, name: str) -> tuple[pathlib.Path, int] | None:
        f = self._where[name]
        return f.path, f.entries[name].start

    def close(self) -> None:
        for f in self._open:
            f.close()

    @property
    def metadata(self) -> dict[str, str]:
        return self._open[0].metadata if len(self._open) == 1 else {}


class StateDictCheckpoint(Checkpoint):
    """A state dict already in memory (from a pickle, or given directly)."""

    def __init__(self, path: pathlib.Path, state: dict[str, torch.Tensor], files: list[pathlib.Path],
                 config: dict | None = None) -> None:
        self._state = state
        tensors = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in state.items()}
        record = config[RECORD_KEY] if config is not None and RECORD_KEY in config else None
        super().__init__(path, tensors, files, record, config)

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name]


def _record_from_metadata(path: pathlib.Path, metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(RECORD_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its normswap metadata is not valid JSON ({type(exc).__name__})") from None
    return record


def load_pickle(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.bin`` file, through ``torch.load(weights_only=True)`` only.

    Zip-format files are memory-mapped. A pickle that would import or call anything beyond tensors and
    plain containers raises :class:`~normswap.errors.UnsafeCheckpointError` before any of it runs.

    Example:
        >>> state = load_pickle(pathlib.Path("model.pth"))  # doctest: +SKIP
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is not None or "Weights only load failed" in str(exc):
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path}: refused: loading this pickle would import or call code{what}, which normswap never "
                "runs (it loads pickles only with torch.load(weights_only=True)). If you trust the file, load it "
                "yourself and save its state dict with safetensors.torch.save_file.") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc}); it is truncated or corrupt") from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                              "it is truncated or corrupt") from None
    return _unwrap_state_dict(path, obj)


def _unwrap_state_dict(path: pathlib.Path, obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: nested under a known key, ``module.`` (DDP) removed."""
    for _ in range(3):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = ", ".join(map(repr, list(obj)[:6])) if isinstance(obj, dict) else ""
        raise CheckpointError(f"{path}: holds a {kind}{' with keys ' + keys if keys else ''}, not a state dict "
                              f"of tensors (looked under {', '.join(NESTED_KEYS)})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def hf_weight_files(folder: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """The weight files of an HF model folder: ``("safetensors"|"pickle", [files])``."""
    for name in HF_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return ("safetensors" if name.endswith(".safetensors") else "pickle"), [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            names = set(weight_map.values())
            if not all(isinstance(n, str) for n in names):
                raise TypeError("shard names must be strings")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a valid shard index ({type(exc).__name__}: {exc})") from None
        outside = sorted(n for n in names if not _inside(folder, folder / n))
        if outside:
            raise CheckpointError(f"{path}: names shards outside its folder ({', '.join(map(repr, outside[:3]))}); "
                                  "normswap reads only files inside the folder it is given")
        shards = sorted(folder / n for n in names)
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{path}: lists shards that are not in the folder: {', '.join(missing[:5])}")
        return ("safetensors" if name.startswith("model.safetensors") else "pickle"), shards
    raise CheckpointNotFoundError(f"{folder}: an HF model folder without weights (looked for {', '.join(HF_WEIGHTS)})")


def _inside(folder: pathlib.Path, path: pathlib.Path) -> bool:
    """Whether ``path`` is a plain name inside ``folder``: no ``..``, not absolute, no link leading out."""
    if path.is_symlink():
        return False
    try:
        return path.resolve().parent == folder.resolve() and path.name not in ("", ".", "..")
    except OSError:
        return False


def read_config(folder: pathlib.Path) -> dict | None:
    """The ``config.json`` of an HF model folder as a dict, or ``None`` when there is none."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def open_checkpoint(path: str | os.PathLike,
                    check_record: Callable[[object, str], dict] | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin``/``.ckpt`` pickle, or an HF model folder.

    The normswap record it carries (the JSON under ``__metadata__["normswap"]``, or ``config.json``'s
    ``"normswap"`` entry) is untrusted input: ``check_record(record, where)`` returns it validated or raises
    (the checkpoints package passes its schema check).

    Example:
        >>> with open_checkpoint("./bert-finetuned") as ckpt:  # doctest: +SKIP
        ...     sorted(ckpt.tensors)[:2]
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise CheckpointNotFoundError(f"{path}: not readable (permission denied)")
    if path.is_dir():
        kind, files = hf_weight_files(path)
        config = read_config(path)
    else:
        kind, files, config = _kind_of_file(path), [path], None
    if kind == "safetensors":
        ckpt: Checkpoint = SafetensorsCheckpoint(path, files, config)
    else:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_pickle(f))
        ckpt = StateDictCheckpoint(path, state, files, config)
    if check_record is not None and ckpt.record is not None:
        where = str(path / "config.json") if config is not None and RECORD_KEY in config else str(path)
        try:
            ckpt.record = check_record(ckpt.record, where)
        except BaseException:
            ckpt.close()
            raise
    return ckpt


def _kind_of_file(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors, "
                          f"{'/'.join(PICKLE_SUFFIXES)} or an HF model folder")
