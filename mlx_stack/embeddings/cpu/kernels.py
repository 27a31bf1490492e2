"""Vectorised encoder kernels for MLX arrays on the CPU, compiled on first use.

MLX's CPU backend computes ``exp`` and ``erf`` one scalar at a time (~40 M values/s here) and
its other elementwise operations on one core, so an encoder's softmax, GELU, bias additions
and layer norms cost more than its matrix products. A few lines of C++ built with
``-O3 -march=native -ffast-math`` use glibc's vector maths (libmvec) and fuse each step into
one pass: ~1,000 M values/s for softmax, ~800 M for GELU, max error ~1e-6. The C++ is
``kernels.cpp`` beside this file (package data, read with ``importlib.resources``); it is built
once per source, compiler and CPU with the C++ compiler ``mx.compile`` needs anyway (``$CXX`` or
``g++``) into ``~/.cache/mlx-stack/kernels`` and loaded with ctypes: only a library of the
user's own, in a folder nobody else can write, and only after a self-check (see ``load``).

The functions work **in place** on an evaluated, row-contiguous float32 MLX array, through its
writable buffer: callers pass only arrays they created and nobody else holds (a fresh matrix
product), so no copy is made. ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import logging
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_stack.atomic import write_atomic
from mlx_stack.private import distrust, make_dirs, owner_only, safe_ancestors

log = logging.getLogger("mlx_stack.embeddings")

SOURCE_FILE = "kernels.cpp"

_PARALLEL_WORK = 1 << 22
"""Multiply-adds (pairs x tokens^2 x head_dim) above which attention uses two threads."""

_FLAGS = ("-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17")
_ARCH_FLAGS = ("-march=native",)
_TOLERANCE = 1e-5


class Kernels:
    """The loaded library. Every method takes evaluated MLX arrays and writes its first one."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._softmax = _function(library.mlxs_softmax, ptr, i64, i64, f32, ptr, i64)
        self._bias_add = _function(library.mlxs_bias_add, ptr, ptr, i64, i64)
        self._bias_gelu = _function(library.mlxs_bias_gelu, ptr, ptr, i64, i64)
        self._add_layernorm = _function(
            library.mlxs_add_layernorm, ptr, ptr, ptr, ptr, ptr, i64, i64, f32
        )
        self._swiglu = _function(library.mlxs_swiglu, ptr, ptr, i64)
        self._attention = _function(
            library.mlxs_attention, ptr, ptr, i64, i64, i64, f32, i64, i64, ptr
        )
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernels")
        self.parallel_work = _PARALLEL_WORK

    def attention_(self, qkv: Any, mask: Any | None, heads: int, scale: float) -> None:
        """Softmax attention over ``qkv`` ``[batch, tokens, 3 * heads * head_dim]`` (q, k, v
        side by side, heads inside each; ``head_dim`` a multiple of 16). The context replaces
        q: read it as ``qkv.reshape(batch, tokens, 3, -1)[:, :, 0]``. Large jobs use two
        threads."""
        view = _view(qkv)
        batch, tokens, width = view.shape
        head_dim = width // (3 * heads)
        if head_dim * 3 * heads != width or head_dim % 16:
            raise ValueError(f"qkv width {width} is not 3 x {heads} heads of 16k dims")
        mask_ptr = _pointer(mask, tokens)
        pairs = batch * heads
        padded = -(-tokens // 32) * 32

        def run(first: int, last: int) -> None:
            scratch = np.empty(2 * head_dim * padded + 8 * padded, dtype=np.float32)
            self._attention(
                view.ctypes.data,
                mask_ptr,
                tokens,
                heads,
                head_dim,
                scale,
                first,
                last,
                scratch.ctypes.data,
            )

        if pairs < 2 or pairs * tokens * tokens * head_dim < self.parallel_work:
            run(0, pairs)
            return
        half = pairs // 2
        other = self._helper.submit(run, half, pairs)  # ctypes releases the GIL
        run(0, half)
        other.result()

    def softmax_(self, scores: Any, scale: float, bias: Any | None, bias_period: int) -> None:
        """Softmax over the last axis after ``scores * scale + bias[row // bias_period]``."""
        view = _view(scores)
        cols = view.shape[-1]
        bias_ptr = _pointer(bias, cols)
        self._softmax(view.ctypes.data, view.size // cols, cols, scale, bias_ptr, bias_period)

    def bias_add_(self, x: Any, bias: Any) -> None:
        view = _view(x)
        cols = view.shape[-1]
        self._bias_add(view.ctypes.data, _pointer(bias, cols), view.size // cols, cols)

    def bias_gelu_(self, x: Any, bias: Any | None) -> None:
        """Exact GELU of ``x + bias`` (``bias`` may be ``None``)."""
        view = _view(x)
        cols = view.shape[-1]
        self._bias_gelu(view.ctypes.data, _pointer(bias, cols), view.size // cols, cols)

    def add_layernorm_(
        self, x: Any, bias: Any | None, residual: Any, weight: Any, shift: Any, eps: float
    ) -> None:
        """``layer_norm(x + bias + residual) * weight + shift`` over the last axis."""
        view = _view(x)
        cols = view.shape[-1]
        rest = _view(residual)
        if rest.shape != view.shape:
            raise ValueError(f"residual shape {rest.shape} differs from {view.shape}")
        self._add_layernorm(
            view.ctypes.data,
            _pointer(bias, cols),
            rest.ctypes.data,
            _pointer(weight, cols),
            _pointer(shift, cols),
            view.size // cols,
            cols,
            eps,
        )

    def swiglu_(self, up: Any, gate: Any) -> None:
        """``up = up * silu(gate)``."""
        up_view, gate_view = _view(up), _view(gate)
        if up_view.shape != gate_view.shape:
            raise ValueError(f"swiglu shapes differ: {up_view.shape} vs {gate_view.shape}")
        self._swiglu(up_view.ctypes.data, gate_view.ctypes.data, up_view.size)


def _function(function: Any, *argtypes: Any) -> Any:
    function.restype = None
    function.argtypes = list(argtypes)
    return function


@dataclass(frozen=True)
class Pinned:
    """A constant vector (a bias, a norm's weight) whose address is taken once, not per call.

    Holds the array, so the memory stays alive; the kernels only read it.
    """

    array: Any
    address: int
    length: int


def pin(array: Any) -> Pinned:
    view = _view(array, writable=False)
    return Pinned(array, int(view.ctypes.data), int(view.shape[-1]))


def _pointer(array: Any | None, cols: int) -> int | None:
    """Address of a vector/rows argument whose last axis must be ``cols`` long."""
    if array is None:
        return None
    if isinstance(array, Pinned):
        if array.length != cols:
            raise ValueError(f"expected a last axis of {cols}, got {array.length}")
        return array.address
    view = _view(array, writable=False)
    if view.shape[-1] != cols:
        raise ValueError(f"expected a last axis of {cols}, got shape {view.shape}")
    return int(view.ctypes.data)


def _view(array: Any, writable: bool = True) -> np.ndarray:
    """A zero-copy numpy view of an evaluated MLX array; refuses what the C code cannot use."""
    view = np.asarray(memoryview(array))
    if view.dtype != np.float32 or not view.flags.c_contiguous:
        raise ValueError("CPU kernels need evaluated, row-contiguous float32 arrays")
    if writable and not view.flags.writeable:
        raise ValueError("CPU kernels need a writable output array")
    return view


_loaded: Kernels | None = None
_failure: str | None = None


def load() -> Kernels | None:
    """Build (once per machine and source) and load the kernels; ``None`` if impossible.

    Never raises: without a compiler, or with a library that fails to load, lacks a function
    or fails its self-check, the caller keeps MLX's own (slow but exact) kernels, and the log
    says why.
    """
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded
    try:
        kernels = _load_or_build()
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        _failure = str(exc)
        log.warning("fast CPU kernels unavailable, using MLX's: %s", _failure)
        return None
    _loaded = kernels
    return kernels


def _load_or_build() -> Kernels:
    """The cached library if it is ours and works; else a fresh build.

    Only a library the user owns, that nobody else can write, in a folder with the same
    properties, is ever loaded: loading runs its constructors inside the server. A fresh build
    is loaded and self-checked from its private work folder *before* it replaces the cached
    one, so the cache only ever holds a library that passed. Without a private cache folder
    the build goes to a folder made for this process (``mkdtemp``) and is not kept.
    """
    compiler = os.environ.get("CXX", "g++")
    code = read_source()
    name = library_name(code, compiler)
    folder, why_not = _cache_dir()
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="mlxs-kernels-") as work:
            log.warning("no private cache folder for the CPU kernels (%s): building them for "
                        "this process only, in %s", why_not, work)
            return _build(compiler, code, Path(work), None)
    cached = folder / name
    try:
        st: os.stat_result | None = os.lstat(cached)
    except FileNotFoundError:
        st = None
    if st is not None:
        problem = _why_not_load(cached, st)
        if problem is None:
            try:
                return _open(cached)
            except (OSError, RuntimeError, ValueError) as exc:
                problem = f"it is broken ({exc})"
        log.warning("not using the cached CPU kernels %s: %s; building them again",
                    cached, problem)
    return _build(compiler, code, folder, cached)


def _why_not_load(cached: Path, st: os.stat_result) -> str | None:
    """Why a cached library must not be loaded, or ``None``.

    Besides its owner and mode, its bytes must match the checksum recorded when it was built
    and passed its self-check: a truncated library is not refused by the dynamic loader, it
    crashes the process (SIGBUS) when a missing page is touched.
    """
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    problem = distrust(st)
    if problem:
        return problem
    sums = _checksum_file(cached)
    try:
        recorded_st = os.lstat(sums)
        if not stat.S_ISREG(recorded_st.st_mode) or distrust(recorded_st):
            return f"its checksum file {sums.name} is not trustworthy"
        recorded = sums.read_text(encoding="ascii").strip()
        actual = _digest(cached)
    except (OSError, UnicodeDecodeError):
        return f"it has no readable checksum file {sums.name}"
    if recorded != actual:
        return "its bytes differ from the checksum recorded at build time (damaged or truncated)"
    return None


def _checksum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(path: Path) -> Kernels:
    """Load a library and check every kernel against numpy; raises if anything is amiss."""
    library = ctypes.CDLL(str(path))
    try:
        kernels = Kernels(library, path)
    except AttributeError as exc:  # a library without one of our functions
        raise RuntimeError(f"{path.name} lacks a kernel: {exc}") from None
    _self_test(kernels)
    return kernels


def _build(compiler: str, code: str, folder: Path, target: Path | None) -> Kernels:
    """Compile in a private work folder inside ``folder``, load and check the result, then
    publish it as ``target`` (atomically, so concurrent builders never see half a file)."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) on PATH; install g++")
    errors: list[str] = []
    for arch in (_ARCH_FLAGS, ()):  # -march=native is refused by some compilers/arches
        with tempfile.TemporaryDirectory(dir=folder) as work:
            source = Path(work) / "kernels.cpp"
            source.write_text(code, encoding="utf-8")
            built = Path(work) / "kernels.so"
            command = [compiler, *_FLAGS, *arch, str(source), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0 and built.is_file():
                kernels = _open(built)  # a unique path: never the loader's cached handle
                if target is not None:
                    os.chmod(built, 0o700)
                    write_atomic(_checksum_file(target), _digest(built) + "\n")
                    os.replace(built, target)
                    kernels.path = target
                return kernels
            errors.append(result.stderr.strip().splitlines()[-1:][0] if result.stderr else "")
    raise RuntimeError(f"{compiler} failed to build the kernels: {'; '.join(errors)}")


def library_name(code: str, compiler: str) -> str:
    """The built library's file name: a new build whenever the source, the compiler, the
    flags or the CPU change (``-march=native`` output depends on the CPU)."""
    key = hashlib.sha256(
        "\0".join([code, compiler, *_FLAGS, platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return f"mlxs-kernels-{key}.so"


def read_source() -> str:
    """The kernels' C++ source, shipped beside this module; part of the build's cache key."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def _cache_base(name: str = "kernels") -> Path:
    """``$XDG_CACHE_HOME/mlx-stack/<name>``, by default under ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-stack" / name


def cache_folder(name: str) -> Path:
    """Where the cache folder ``name`` is (not made, not checked: for reports)."""
    return _cache_base(name)


def private_cache_dir(name: str) -> tuple[Path | None, str]:
    """The private cache folder ``name`` (``kernels``, ``onnx``, ``engine``), as below."""
    return _cache_dir(name)


def _cache_dir(name: str = "kernels") -> tuple[Path | None, str]:
    """The user's private kernel cache, or ``None`` and why it cannot be used.

    Our own folders that are merely open to others (made by older versions) are made private;
    a folder that belongs to someone else, or under a parent another user can write, is not
    used at all (there is no shared fallback folder).
    """
    folder = _cache_base(name)
    try:
        make_dirs(folder)
        for level in (folder.parent, folder):
            st = os.stat(level)
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(level, owner_only(st.st_mode))
                st = os.stat(level)
            problem = distrust(st)
            if problem:
                return None, f"{level}: {problem}"
    except OSError as exc:
        return None, f"{folder}: {exc.strerror or exc}"
    problem = safe_ancestors(folder.parent)
    return (None, problem) if problem else (folder, "")


def _cpu_signature() -> str:
    """``-march=native`` output depends on the CPU: key the cache on its flags."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _self_test(kernels: Kernels) -> None:
    """Compare each kernel with an exact numpy reference; any disagreement disables them all."""
    import mlx.core as mx

    rng = np.random.default_rng(0)

    def run(fill: Any, *arrays: np.ndarray) -> np.ndarray:
        inputs = [mx.array(a) for a in arrays]
        mx.eval(*inputs)
        fill(*inputs)
        return np.array(inputs[0])

    scores = rng.normal(scale=4.0, size=(6, 33)).astype(np.float32)
    mask = np.where(rng.random((2, 33)) < 0.2, -10000.0, 0.0).astype(np.float32)
    shifted = scores * 0.5 + np.repeat(mask, 3, axis=0)
    expected = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    _agree("softmax", run(lambda s, m: kernels.softmax_(s, 0.5, m, 3), scores, mask), expected)

    x = np.linspace(-9.0, 9.0, 1001, dtype=np.float32).reshape(7, 143)
    bias = rng.normal(size=143).astype(np.float32)
    erf = np.vectorize(math.erf)
    z = (x + bias).astype(np.float64)
    expected = 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    _agree("gelu", run(kernels.bias_gelu_, x, bias), expected)
    _agree("bias_add", run(kernels.bias_add_, x, bias), x + bias)

    residual = rng.normal(size=x.shape).astype(np.float32)
    weight = rng.normal(size=143).astype(np.float32)
    shift = rng.normal(size=143).astype(np.float32)
    total = (x + bias + residual).astype(np.float64)
    normal = (total - total.mean(axis=1, keepdims=True)) / np.sqrt(
        total.var(axis=1, keepdims=True) + 1e-12
    )
    got = run(
        lambda a, b, r, w, s: kernels.add_layernorm_(a, b, r, w, s, 1e-12),
        x,
        bias,
        residual,
        weight,
        shift,
    )
    _agree("layernorm", got, normal * weight + shift)

    gate = x[::-1].copy()
    expected = x * gate / (1.0 + np.exp(-gate.astype(np.float64)))
    _agree("swiglu", run(kernels.swiglu_, x, gate), expected)

    heads, tokens = 4, 37
    # one thread, then two; a head size of 48 takes the 16-wide value tiles
    for batch, parallel_work, dim in ((1, _PARALLEL_WORK, 32), (3, 0, 32), (2, 0, 48)):
        kernels.parallel_work = parallel_work
        qkv = rng.normal(size=(batch, tokens, 3, heads, dim)).astype(np.float32)
        pad = np.where(rng.random((batch, tokens)) < 0.3, -10000.0, 0.0).astype(np.float32)
        q, k, v = (qkv[:, :, n].transpose(0, 2, 1, 3).astype(np.float64) for n in range(3))
        scores = q @ k.transpose(0, 1, 3, 2) * 0.25 + pad[:, None, None, :]
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        expected = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * dim)
        flat = qkv.reshape(batch, tokens, -1)
        got = run(lambda a, m: kernels.attention_(a, m, 4, 0.25), flat, pad)
        _agree("attention", got.reshape(batch, tokens, 3, -1)[:, :, 0], expected)
    kernels.parallel_work = _PARALLEL_WORK


def _agree(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    error = float(np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected))))
    if not error < _TOLERANCE:
        raise RuntimeError(f"{name} kernel is off by {error:.2e} (tolerance {_TOLERANCE:.0e})")
