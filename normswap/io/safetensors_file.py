"""Read and write the safetensors format tensor by tensor, without holding a whole file in memory.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
offsets relative to the end of the header), then the raw little-endian tensor bytes.

Reading memory-maps the file: :meth:`SafetensorsFile.tensor` is a view of the mapped bytes (no copy) and
:meth:`SafetensorsFile.release` hands the pages of a tensor already used back to the OS, so the resident
memory of a pass over the file stays near its largest tensor. Writing streams: the header is computed from
the declared dtypes and shapes first, then each tensor's bytes are written as it is produced.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import CheckpointError

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (``start``/``end`` are absolute byte offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _corrupt(path: pathlib.Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({why}); the file is truncated or corrupt "
                           "- copy or download it again")


def read_header(path: pathlib.Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor entries and the ``__metadata__`` of a safetensors file, checked against the file size.

    Example:
        >>> entries, metadata = read_header(pathlib.Path("model.safetensors"))  # doctest: +SKIP
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ is not a map of strings")
    base, entries = 8 + n, {}
    for name, desc in header.items():
        try:
            dtype = DTYPES[desc["dtype"]]
            shape = tuple(int(d) for d in desc["shape"])
            begin, end = (int(o) for o in desc["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"entry {name!r} is malformed ({type(exc).__name__}: {exc})") from None
        expected = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != expected or any(d < 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} declares {end - begin} bytes for shape {list(shape)} "
                                 f"{desc['dtype']} ({expected} bytes)")
        if base + end > size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {base + end} but the file has {size} bytes")
        entries[name] = TensorEntry(dtype, shape, base + begin, base + end)
    return entries, metadata


class SafetensorsFile:
    """A safetensors file opened for reading tensor by tensor.

    Example:
        >>> with SafetensorsFile("model.safetensors") as f:  # doctest: +SKIP
        ...     w = f.tensor("conv1.weight"); ...; f.release("conv1.weight")
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._file = open(self.path, "rb")
            # a private (copy-on-write) mapping: torch views of it are writable, the file never is
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``: a view of the mapped file when aligned, else an aligned copy."""
        e = self.entries[name]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        mm = self._mapped()
        if e.start % e.dtype.itemsize == 0:
            flat = torch.frombuffer(mm, dtype=e.dtype, count=e.nbytes // e.dtype.itemsize, offset=e.start)
        else:
            flat = torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=e.start).clone().view(e.dtype)
        return flat.view(e.shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor ``name`` (read again from disk if it is used again)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        e = self.entries[name]
        start = e.start - e.start % _PAGE
        length = min(len(self._map), e.end) - start
        if length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor view is still alive; the mapping goes when it does
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: its name, dtype, shape and a function that produces it when its turn comes.

    ``raw=(path, offset)`` instead says its bytes lie unchanged in another file: they are copied file to
    file by the kernel (``copy_file_range``), never passing through this process's memory.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor] | None = None
    done: Callable[[], None] = lambda: None
    raw: tuple[pathlib.Path, int] | None = None


def _copy_range(src: BinaryIO, offset: int, nbytes: int, dst: BinaryIO) -> None:
    """Copy ``nbytes`` at ``offset`` of ``src`` to the current end of ``dst``, in the kernel when it can."""
    dst.flush()
    out_fd, in_fd = dst.fileno(), src.fileno()
    copy = getattr(os, "copy_file_range", None)
    while nbytes > 0:
        n = 0
        if copy is not None:
            try:
                n = copy(in_fd, out_fd, min(nbytes, 1 << 30), offset)
            except OSError:  # another filesystem or kernel without it: copy through a buffer
                copy = None
        if n == 0:
            src.seek(offset)
            chunk = src.read(min(nbytes, 1 << 24))
            if not chunk:
                raise CheckpointError(f"{src.name}: ended early while copying (truncated while being read?)")
            dst.write(chunk)
            dst.flush()
            n = len(chunk)
        offset += n
        nbytes -= n
    dst.seek(0, os.SEEK_END)


def write_safetensors(f: BinaryIO, tensors: Iterable[OutputTensor], metadata: dict[str, str] | None = None,
                      *, progress: Callable[[int], None] | None = None) -> int:
    """Stream ``tensors`` into the open binary file ``f`` in safetensors format; returns bytes written.

    Each tensor is produced, written and dropped before the next one. Tensors are laid out largest dtype
    first, so every tensor starts at a multiple of its element size, as the safetensors library does.

    Example:
        >>> import io
        >>> buf = io.BytesIO()
        >>> t = torch.arange(4.0)
        >>> write_safetensors(buf, [OutputTensor("t", t.dtype, tuple(t.shape), lambda: t)])
        80
    """
    items = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: keeps the given order per dtype size
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in items:
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors code")
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    written = 8 + len(raw)
    sources: dict[pathlib.Path, BinaryIO] = {}
    try:
        for t in items:
            written += _write_one(f, t, sources)
            t.done()
            if progress is not None:
                progress(math.prod(t.shape) * t.dtype.itemsize)
    finally:
        for fh in sources.values():
            fh.close()
    return written


def _has_fd(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def _write_one(f: BinaryIO, t: OutputTensor, sources: dict[pathlib.Path, BinaryIO]) -> int:
    nbytes = math.prod(t.shape) * t.dtype.itemsize
    if t.raw is not None and (t.produce is None or _has_fd(f)):
        path, offset = t.raw
        if path not in sources:
            sources[path] = open(path, "rb")
        _copy_range(sources[path], offset, nbytes, f)
        return nbytes
    if t.produce is None:
        raise CheckpointError(f"tensor {t.name!r}: nothing to write it from")
    value = t.produce()
    if value.dtype != t.dtype or tuple(value.shape) != tuple(t.shape):
        raise CheckpointError(f"tensor {t.name!r}: produced {value.dtype} {list(value.shape)}, "
                              f"declared {t.dtype} {list(t.shape)}")
    if value.numel():
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        f.write(memoryview(data.numpy()))
    return nbytes
