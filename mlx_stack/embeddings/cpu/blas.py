"""Give MLX's CPU backend an optimised BLAS on Linux.

The ``mlx-cpu`` wheel links the unoptimised reference BLAS (a 1024x1024 float32 matmul runs at
3-7 GFLOP/s). MLX resolves ``cblas_sgemm`` when ``mlx.core`` is first imported, so a library
exposing that unprefixed symbol must be loaded into the global namespace *before* that import;
loading it afterwards changes nothing. So each MLX process of ours (the embeddings server,
the chat wrapper ``mlx_stack.chat``) calls :func:`preload` with its model folder first.

Which library, when several are found, is measured on the model's own products the first time
(``blaschoice.py``, ``blasmeasure.py``) and cached; without a model folder the generic order
below is used.

This module imports only the standard library (and this package's MLX-free modules), so it is
safe to import before MLX.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import platform
import site
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .blaschoice import ENV_VAR, THREAD_ENV, BlasCache, BlasChoice, Candidate, Host, choose_library

SPIN_ENV = {"KMP_BLOCKTIME": "1"}
"""MKL's OpenMP threads spin this many ms after each product (Intel's default: 200) and then
sleep. 1 ms still spans the gaps between one forward pass's products, so a pass keeps its
speed; but between requests two spinning threads took both cores of a 2-core machine from
whatever came next (the proxy forwarding the answer, the client, the event loop): through the
proxy, a short query's extra time fell from ~14 ms to 1-4 ms and the server's CPU per query by a
third (measured on an AMD EPYC, 2 cores, load ~5). A user's own setting wins."""

REFERENCE = "reference (slow)"
log = logging.getLogger("mlx_stack.embeddings")
ACCELERATE = "Accelerate (Metal/macOS)"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's matmuls will use in this process."""

    name: str
    path: str | None = None
    note: str | None = None
    choice: BlasChoice | None = None
    """How it was chosen (``None`` where there was no choice: macOS, other systems)."""

    @property
    def optimised(self) -> bool:
        return self.name != REFERENCE

    def describe(self) -> str:
        """One human line, for the startup log, ``/v1/models`` and ``doctor``."""
        text = self.name if self.path is None else f"{self.name} ({self.path})"
        if self.choice is not None:
            text += f": {self.choice.reason}" + (" (from cache)" if self.choice.cached else "")
        return text if self.note is None else f"{text}; {self.note}"


_loaded: BlasInfo | None = None
_USER_ENV = {name: os.environ[name] for name in THREAD_ENV if name in os.environ}
"""The thread settings as the user left them: :func:`_try_load` sets OPENBLAS_CORETYPE and
KMP_BLOCKTIME in this process's environment, which must not change the cache key."""
_choices: dict[str | None, BlasChoice] = {}


def preload(env: Mapping[str, str] | None = None, model: Path | None = None) -> BlasInfo:
    """Load the BLAS for ``model`` (a model folder: measured, or read from the cache; else the
    generic order) into the global symbol namespace; idempotent: the first call decides.

    Never raises: a library that fails to load is skipped and the next candidate tried.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        _loaded = BlasInfo(ACCELERATE)
        return _loaded
    if not sys.platform.startswith("linux"):
        _loaded = BlasInfo(REFERENCE, note=f"no BLAS search on {sys.platform}")
        return _loaded
    explicit = env.get(ENV_VAR, "").strip()
    if explicit.lower() == "none":
        _loaded = BlasInfo(REFERENCE, note=f"{ENV_VAR}=none")
        return _loaded
    too_late = "mlx.core" in sys.modules
    chosen = choose(model, env)
    candidates = [explicit] if explicit else _order(chosen)
    for path in candidates:
        info = _try_load(path)
        if info is None:
            continue
        reason = chosen.reason
        if path != chosen.path:
            reason = f"{chosen.name} did not load here; next in the generic order"
        info = replace(info, choice=replace(chosen, path=path, name=info.name, reason=reason))
        if too_late:
            info = BlasInfo(REFERENCE, note=f"{info.name} loaded after mlx.core: no effect")
        _loaded = info
        return _loaded
    note = f"{ENV_VAR}={explicit} has no usable cblas_sgemm" if explicit else None
    if note is None and not candidates:
        note = "no OpenBLAS/MKL found; `apt install libopenblas0-pthread` or `pip install mkl`"
    _loaded = BlasInfo(REFERENCE, note=note)
    return _loaded


def choose(model: Path | None, env: Mapping[str, str] | None = None) -> BlasChoice:
    """Which library MLX should use for ``model``, without loading any in this process.

    ``MLX_STACK_BLAS`` wins; else measured when more than one library is found and ``model``
    has a readable config.json (each library in its own child process), cached per machine,
    libraries and shapes; otherwise the generic order (:func:`candidate_paths`). Memoised per
    process (for the process's own environment).
    """
    memo = str(model) if env is None else None
    env = os.environ if env is None else env
    if memo in _choices:
        return _choices[memo]
    from .blasmeasure import measure

    found = [c for c in (Candidate.of(p) for p in _unique(candidate_paths())) if c is not None]
    host = Host.here(_USER_ENV if env is os.environ else env)
    folder = _cache_folder()
    with _one_at_a_time(folder):  # replicas starting together: one measures, the rest read
        choice = choose_library(model, env.get(ENV_VAR, "").strip(), found, host,
                                BlasCache(folder),
                                lambda paths, shapes: measure(paths, shapes, env))  # fmt: skip
    if memo is not None:  # a failed measurement too: not again in this process
        _choices[memo] = choice
    return choice


@contextlib.contextmanager
def _one_at_a_time(folder: Path | None) -> Iterator[None]:
    """An exclusive lock on the cache folder while choosing: two servers timing their
    libraries at once on a small machine would each slow the other's figures. Without a
    folder (or a lock), no waiting."""
    if folder is None:
        yield
        return
    import fcntl

    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)  # the holder is done within its budget (~5 s)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_choices() -> list[dict[str, object]]:
    """Every measured choice cached on this machine, newest first (for ``doctor``)."""
    return BlasCache(_cache_folder()).entries()


def _order(chosen: BlasChoice) -> list[str]:
    """The chosen library first, then the rest in the generic order."""
    rest = [p for p in _unique(candidate_paths()) if p != chosen.path]
    return ([chosen.path] if chosen.path else []) + rest


def _unique(paths: Iterator[str]) -> list[str]:
    """One path per file (``libmkl_rt.so`` and ``.so.3`` may be the same library)."""
    seen: dict[str, str] = {}
    for path in paths:
        seen.setdefault(os.path.realpath(path), path)
    return list(seen.values())


def _cache_folder() -> Path | None:
    from .kernels import private_cache_dir

    return private_cache_dir("blas")[0]


def candidate_paths() -> Iterator[str]:
    """Libraries known to export unprefixed ``cblas_sgemm``, best first.

    MKL (the ``mkl`` wheel, a dependency on Linux x86_64) first: on MiniLM it cut a short
    text's forward pass by ~35% against OpenBLAS 0.3.15/0.3.21, whose small-matrix products are
    slower (docs/benchmarks.md). numpy's and scipy-openblas' copies are absent on purpose:
    their symbols are prefixed.
    """
    prefixes = [sys.prefix, sys.base_prefix]
    with contextlib.suppress(AttributeError):  # pip install --user puts the wheel's lib here
        prefixes.append(site.getuserbase())
    for prefix in dict.fromkeys(prefixes):
        yield from sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    for folder in _site_dirs():
        yield from sorted(glob.glob(os.path.join(folder, "opencv*.libs", "libopenblas*.so*")))
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    for lib_dir in (f"/usr/lib/{triplet}", "/usr/lib64", "/usr/lib"):
        for flavour in ("openblas-pthread", "openblas-openmp", "openblas-serial"):
            yield from _existing(f"{lib_dir}/{flavour}/libopenblas.so.0")
        yield from _existing(f"{lib_dir}/libopenblas.so.0", f"{lib_dir}/libopenblasp.so.0")


def _try_load(path: str) -> BlasInfo | None:
    if not os.path.isfile(path):
        return None
    is_openblas = "openblas" in Path(path).name
    if is_openblas:
        _choose_openblas_core()
    elif "mkl" in Path(path).name:
        for name, value in SPIN_ENV.items():  # read when MKL's threads first start
            os.environ.setdefault(name, value)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    if not hasattr(lib, "cblas_sgemm"):
        return None
    if is_openblas:
        return BlasInfo(_openblas_name(lib), path)
    if "mkl" in Path(path).name:
        return BlasInfo(_mkl_name(lib), path)
    return BlasInfo(Path(path).name, path)


def _choose_openblas_core() -> None:
    """Pick OpenBLAS' kernel ourselves when the CPU has AVX2/AVX-512.

    Older OpenBLAS builds (opencv's 0.3.15) do not recognise recent or virtualised Xeons and
    fall back to the generic "Prescott" kernel: 35-55 GFLOP/s instead of ~200 measured here.
    The variable is read once, when the library initialises, and a user's setting wins.
    """
    core = _openblas_core()
    if "OPENBLAS_CORETYPE" not in os.environ and core:
        os.environ["OPENBLAS_CORETYPE"] = core


def _openblas_core() -> str | None:
    """The kernel :func:`_choose_openblas_core` picks for this CPU, if any."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _openblas_name(lib: ctypes.CDLL) -> str:
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode().split()
        core = lib.openblas_get_corename().decode()
    except (AttributeError, UnicodeDecodeError):
        return "OpenBLAS"
    version = config[1] if len(config) > 1 else ""
    return f"OpenBLAS {version} ({core})".replace("  ", " ")


def _mkl_name(lib: ctypes.CDLL) -> str:
    """``MKL 2026.2`` from ``mkl_get_version_string`` ("Intel(R) oneAPI Math Kernel Library
    Version 2026.2-Product Build ...")."""
    try:
        buffer = ctypes.create_string_buffer(256)
        lib.mkl_get_version_string(buffer, len(buffer))
        words = buffer.value.decode(errors="replace").split()
    except AttributeError:
        return "MKL"
    version = next((w.split("-")[0] for w in words if w[:1].isdigit()), "")
    return f"MKL {version}".strip()


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["platlib"], sysconfig.get_paths()["purelib"]]
    with contextlib.suppress(AttributeError):  # absent in some embedded interpreters
        dirs += site.getsitepackages()
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _existing(*paths: str) -> Iterator[str]:
    return (p for p in paths if os.path.isfile(p))
