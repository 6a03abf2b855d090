"""Fused CPU kernels of normswap's norm layers, compiled from the C sources beside this file on first use.

torch has no fused CPU kernel for RMSNorm's backward nor for the BERT LayerNorm, and composing torch ops costs
extra passes over memory (each op reads and writes whole tensors); its batch-norm backward cannot write into
a slice of a larger tensor, which costs GhostBatchNorm a full copy. ``row_kernels.c`` does each row norm's
forward and backward in one pass over the data, ``ghost_batch_norm.c`` the GhostBatchNorm backward in place.
This module compiles them with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``; about a
second), caches the shared library, and calls it through ``ctypes``.

* Cache: ``$NORMSWAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/normswap``, else ``~/.cache/normswap``; one file per
  (source, flags, CPU) so that a cache shared between different machines never loads code built for another
  CPU. One process builds at a time (a file lock: every ``torchrun`` rank starts at once), writing a temporary
  file renamed into place, so no process sees a partial library.
* Threads: each call uses at most ``torch.get_num_threads()`` OpenMP threads (fewer for small inputs); one
  thread runs without entering OpenMP, so a forked child (a DataLoader worker) never touches the parent's
  thread pool. Where the build fails, or has no OpenMP, a warning says so once, with the fix.
* Fallback: where no compiler works, or with ``NORMSWAP_NATIVE=0``, the layers use their torch-ops path (same
  results, slower); :func:`status` says which path is in use and why.
* Scope: plain CPU tensors whose compute dtype is float32 (float32 inputs, and half inputs, which the row norms
  upcast), in eager mode; for GhostBatchNorm, channels-first contiguous float32 inputs. float64, CUDA, tensor
  subclasses and ``torch.compile`` take the torch-ops path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available", "status", "usable", "rms_forward", "rms_backward", "bert_forward", "bert_backward",
    "ghost_bn_backward",
]

_log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name(name) for name in ("row_kernels.c", "ghost_batch_norm.c", "channel_layer_norm.c")]
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet


def _cpu_signature() -> str:
    """Something that changes when the CPU (and so ``-march=native``) changes."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """``$NORMSWAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/normswap``, else ``~/.cache/normswap``."""
    root = os.environ.get("NORMSWAP_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "normswap"


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One build at a time across processes (every ``torchrun`` rank starts at once): an exclusive lock on a
    file in the cache folder; where locking is not available, builds race harmlessly (atomic renames)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(folder / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compilers() -> list[str]:
    found = [os.environ["CC"]] if os.environ.get("CC") else []
    found += [c for c in (shutil.which(name) for name in ("cc", "gcc", "clang")) if c]
    return list(dict.fromkeys(found))


def _build() -> Path:
    """Compile the kernels (or find them in the cache), one process at a time; the shared library's path."""
    with _build_lock(_cache_dir()):
        return _build_unlocked()


def _build_unlocked() -> Path:
    source = b"\0".join(path.read_bytes() for path in _SOURCES)
    errors = []
    for cc in _compilers():
        for flags in _FLAG_SETS:
            key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                             _cpu_signature().encode(), platform.machine().encode()]))
            target = _cache_dir() / f"row_kernels-{key.hexdigest()[:16]}.so"
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                proc = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", tmp, *map(str, _SOURCES), "-lm"],
                                      capture_output=True, text=True, timeout=120)
                if proc.returncode == 0:
                    os.replace(tmp, target)
                    return target
                errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{cc} {' '.join(flags)}: {exc}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    raise OSError("no C compiler could build the kernels" + (f" ({'; '.join(errors)})" if errors else
                                                            " (none found: set $CC)"))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for name in ("normswap_rms_fwd", "normswap_bert_fwd"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, i64, i64, f64, i32]
        fn.restype = None
    for name in ("normswap_rms_bwd", "normswap_bert_bwd"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, p, p, i64, i64, i32]
        fn.restype = i32
    lib.normswap_ghost_bn_bwd.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i32]
    lib.normswap_ghost_bn_bwd.restype = None
    lib.normswap_ghost_bn_fwd.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, f64, i32]
    lib.normswap_ghost_bn_fwd.restype = None
    lib.normswap_cln_fwd.argtypes = [p, p, p, p, p, p, i64, i64, i64, f64, i32]
    lib.normswap_cln_fwd.restype = None
    lib.normswap_cln_bwd.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i32]
    lib.normswap_cln_bwd.restype = i32
    for name in ("normswap_last_threads", "normswap_openmp"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = i32


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("NORMSWAP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _status = "off: NORMSWAP_NATIVE=0 (torch-ops path)"
            return None
        try:
            path = _build()
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (OSError, AttributeError) as exc:
            _status = f"unavailable: {exc} (torch-ops path)"
            _log.info("normswap native kernels %s", _status)
            warnings.warn(f"normswap: the fused CPU kernels could not be built ({exc}); the norm layers run torch ops "
                          "instead (same results, slower). Install a C compiler (gcc or clang) or set $CC to one; "
                          "NORMSWAP_NATIVE=0 silences this", RuntimeWarning, stacklevel=3)
            return None
        _lib, _status = lib, f"on: {path}"
        if not lib.normswap_openmp():
            _status += " (built without OpenMP: one thread)"
            warnings.warn("normswap: the fused CPU kernels were built without OpenMP, so they run on one thread (a "
                          "compiler without it, such as Apple clang); install one with OpenMP (gcc, or clang with "
                          "libomp) and clear the cache folder to use every core", RuntimeWarning, stacklevel=3)
        return _lib


def last_threads() -> int:
    """How many threads the last fused-kernel call asked for (0 before any): ``torch.get_num_threads()``
    bounds it, and small inputs use fewer.

    Example:
        >>> last_threads() >= 0
        True
    """
    lib = _load()
    return int(lib.normswap_last_threads()) if lib is not None else 0


def available() -> bool:
    """Whether the fused CPU kernels are built and loaded (builds them on the first call).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _load() is not None


def status() -> str:
    """One line saying whether the fused CPU kernels are in use and, if not, why.

    Example:
        >>> status().split(":")[0] in ("on", "off", "unavailable")
        True
    """
    _load()
    return str(_status)


def usable(x: Tensor) -> bool:
    """Whether a row norm over ``x`` (already in its compute dtype) can run on the fused kernels.

    Not under ``torch.compile`` (the compiler fuses the torch-ops path itself and cannot trace a foreign
    call), nor for tensor subclasses (fake, meta-like or distributed tensors have no plain data pointer) or
    the storage-less wrappers of ``torch.func`` transforms.
    """
    if torch.compiler.is_compiling():
        return False
    return (type(x) is Tensor and x.is_cpu and x.dtype == torch.float32 and _load() is not None
            and has_data(x))


def has_data(x: Tensor) -> bool:
    """Whether ``x`` has a data pointer a foreign kernel can use: a ``torch.func`` transform's wrapper (the
    gradient in a ``torch.func.grad`` backward) has none, though its type is ``Tensor``."""
    try:
        x.data_ptr()
    except RuntimeError:
        return False
    return True


def _required() -> ctypes.CDLL:
    """The loaded library (checked first: this runs on every call), or an error saying why there is none."""
    if _lib is not None:
        return _lib
    lib = _load()
    if lib is None:
        raise RuntimeError(f"normswap fused CPU kernels are {_status}; check native.available() first.")
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _vector(p: Tensor | None) -> Tensor | None:
    """A weight or bias as contiguous float32 memory (itself when it already is: the common case).

    The C kernels read raw pointers: a caller keeps what this returns in a local variable until the call has
    returned (a temporary whose pointer alone is passed would be freed before the kernel reads it)."""
    if p is None or (p.dtype == torch.float32 and p.is_contiguous()):
        return p
    return p.reshape(-1).to(torch.float32).contiguous()


def _dense(t: Tensor) -> Tensor:
    """``t`` as contiguous float32 memory (itself when it already is); the same rule as :func:`_vector`."""
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def _forward(name: str, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, stats: int) -> tuple[Tensor, Tensor]:
    lib = _required()
    x = _dense(x)
    rows, d = x.shape
    y = torch.empty_like(x)
    st = torch.empty(rows, stats, dtype=torch.float32)
    w, b = _vector(w), _vector(b)
    getattr(lib, name)(x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), st.data_ptr(), rows, d, float(eps),
                        torch.get_num_threads())
    return y, st


def _backward(
    name: str, gy: Tensor, x: Tensor, st: Tensor, w: Tensor | None, need: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    lib = _required()
    gy, x, st = _dense(gy), _dense(x), _dense(st)
    rows, d = x.shape
    gx = torch.empty_like(x) if need[0] else None
    gw = torch.empty(d, dtype=torch.float32) if need[1] else None
    gb = torch.empty(d, dtype=torch.float32) if need[2] else None
    w = _vector(w)
    rc = getattr(lib, name)(gy.data_ptr(), x.data_ptr(), st.data_ptr(), _ptr(w), _ptr(gx), _ptr(gw), _ptr(gb),
                             rows, d, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"normswap {name}: could not allocate {2 * d} floats per thread of scratch memory.")
    return gx, gw, gb


def rms_forward(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm of the rows of a float32 CPU ``[rows, d]`` tensor: ``(y, rstd)`` with ``rstd`` ``[rows, 1]``."""
    return _forward("normswap_rms_fwd", x, w, b, eps, 1)


def rms_backward(gy: Tensor, x: Tensor, rstd: Tensor, w: Tensor | None, need: tuple[bool, bool, bool]):
    """Gradients ``(dx, dw, db)`` of :func:`rms_forward` (``None`` where ``need`` is False), float32."""
    return _backward("normswap_rms_bwd", gy, x, rstd, w, need)


def bert_forward(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """BERT LayerNorm of the rows of a float32 CPU ``[rows, d]`` tensor: ``(y, stats)``, stats ``[rows, 3]``."""
    return _forward("normswap_bert_fwd", x, w, b, eps, 3)


def bert_backward(gy: Tensor, x: Tensor, stats: Tensor, w: Tensor | None, need: tuple[bool, bool, bool]):
    """Gradients ``(dx, dw, db)`` of :func:`bert_forward` (``None`` where ``need`` is False), float32."""
    return _backward("normswap_bert_bwd", gy, x, stats, w, need)


def channel_ln_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over dim 1 of a contiguous ``[N, C, *]`` float32 CPU tensor: ``y`` and the per-position
    mean and inverse std (``[N, S]``) the backward needs."""
    lib = _required()
    x, w, b = _dense(x), _vector(weight), _vector(bias)
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    y = torch.empty_like(x)
    mean = torch.empty(n, s, dtype=torch.float32)
    rstd = torch.empty(n, s, dtype=torch.float32)
    lib.normswap_cln_fwd(x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, c, s,
                         float(eps), torch.get_num_threads())
    return y, mean, rstd


def channel_ln_backward(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_x: bool,
                        need_w: bool, need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`channel_ln_forward`: ``dx``, ``dweight``, ``dbias`` (``None`` where not wanted)."""
    lib = _required()
    gy, x, mean, rstd, w = _dense(gy), _dense(x), _dense(mean), _dense(rstd), _vector(weight)
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty(c, dtype=torch.float32) if need_w else None
    gb = torch.empty(c, dtype=torch.float32) if need_b else None
    nthreads = torch.get_num_threads()
    if lib.normswap_cln_bwd(gy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(w),
                            _ptr(gx), _ptr(gw), _ptr(gb), n, c, s, nthreads) != 0:
        raise MemoryError("normswap channel LayerNorm backward: could not allocate its scratch memory")
    return gx, gw, gb


def ghost_bn_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: tuple[int, ...], eps: float, want_var: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Training-mode batch norm of each virtual batch of a contiguous channels-first float32 CPU input.

    Returns ``y``, each batch's ``mean`` and ``invstd`` (``[k, C]``, for the backward) and, with ``want_var``,
    its unbiased variance (for the running statistics).
    """
    lib = _required()
    x, w, b = _dense(x), _vector(weight), _vector(bias)
    n, c = x.shape[:2]
    k = len(sizes)
    starts = torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)
    y = torch.empty_like(x)
    mean = torch.empty(k, c, dtype=torch.float32)
    invstd = torch.empty(k, c, dtype=torch.float32)
    var = torch.empty(k, c, dtype=torch.float32) if want_var else None
    lib.normswap_ghost_bn_fwd(x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean.data_ptr(),
                              invstd.data_ptr(), _ptr(var), starts.data_ptr(), k, c, x.numel() // max(n * c, 1),
                              float(eps), torch.get_num_threads())
    return y, mean, invstd, var


def ghost_bn_backward(
    gy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, sizes: tuple[int, ...],
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training-mode batch-norm backward of each virtual batch of a channels-first float32 CPU input.

    ``x`` and ``gy`` are ``[N, C, *]``, cut along N into virtual batches of ``sizes``; ``mean`` / ``invstd`` are
    each batch's statistics, ``[k, C]`` float32. Returns ``dx`` (``None`` unless ``need_x``) and the per-batch
    weight and bias gradient sums ``[k, C]``.
    """
    lib = _required()
    gy, x, mean, invstd, w = _dense(gy), _dense(x), _dense(mean), _dense(invstd), _vector(weight)
    n, c = x.shape[:2]
    k = len(sizes)
    starts = torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)
    gx = torch.empty_like(x) if need_x else None
    gws = torch.empty(k, c, dtype=torch.float32)
    gbs = torch.empty(k, c, dtype=torch.float32)
    lib.normswap_ghost_bn_bwd(gy.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(), _ptr(w), _ptr(gx),
                              gws.data_ptr(),
                              gbs.data_ptr(), starts.data_ptr(), k, c, x.numel() // max(n * c, 1),
                              torch.get_num_threads())
    return gx, gws, gbs
