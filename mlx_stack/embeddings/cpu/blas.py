"""Give MLX's CPU backend an optimised BLAS on Linux.

The ``mlx-cpu`` wheel links the unoptimised reference BLAS (a 1024x1024 float32 matmul runs at
3-7 GFLOP/s). MLX resolves ``cblas_sgemm`` when ``mlx.core`` is first imported, so a library
exposing that unprefixed symbol must be loaded into the global namespace *before* that import;
loading it afterwards changes nothing. Child processes get the same effect through
``LD_PRELOAD`` (see :func:`child_env`).

This module imports only the standard library, so it is safe to import before MLX.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import platform
import site
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "MLX_STACK_BLAS"
"""An explicit library path, or ``none`` to keep the reference BLAS."""

SPIN_ENV = {"KMP_BLOCKTIME": "1"}
"""MKL's OpenMP threads spin this many ms after each product (Intel's default: 200) and then
sleep. 1 ms still spans the gaps between one forward pass's products, so a pass keeps its
speed; but between requests two spinning threads took both cores of a 2-core machine from
whatever came next (the proxy forwarding the answer, the client, the event loop): through the
proxy, a short query's extra time fell from ~14 ms to 1-4 ms and the server's CPU per query by a
third (measured on an AMD EPYC, 2 cores, load ~5). A user's own setting wins."""

REFERENCE = "reference (slow)"
ACCELERATE = "Accelerate (Metal/macOS)"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's matmuls will use in this process."""

    name: str
    path: str | None = None
    note: str | None = None

    @property
    def optimised(self) -> bool:
        return self.name != REFERENCE

    def describe(self) -> str:
        """One human line, for the startup log and ``/v1/models``."""
        text = self.name if self.path is None else f"{self.name} ({self.path})"
        return text if self.note is None else f"{text}; {self.note}"


_loaded: BlasInfo | None = None


def preload(env: Mapping[str, str] | None = None) -> BlasInfo:
    """Load the best BLAS found into the global symbol namespace; idempotent.

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
    candidates = [explicit] if explicit else list(candidate_paths())
    skipped: list[str] = []
    for path in candidates:
        info = _try_load(path)
        if info is None:
            skipped.append(path)
            continue
        if too_late:
            info = BlasInfo(REFERENCE, note=f"{info.name} loaded after mlx.core: no effect")
        _loaded = info
        return _loaded
    note = f"{ENV_VAR}={explicit} has no usable cblas_sgemm" if explicit else None
    if note is None and not candidates:
        note = "no OpenBLAS/MKL found; `apt install libopenblas0-pthread` or `pip install mkl`"
    _loaded = BlasInfo(REFERENCE, note=note)
    return _loaded


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


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child MLX process (e.g. ``mlx_lm.server``) with the BLAS preloaded.

    Unchanged when no optimised library was found, or on macOS.
    """
    env = dict(os.environ if base is None else base)
    info = preload()
    if info.path is None or not info.optimised:
        return env
    current = env.get("LD_PRELOAD", "")
    if info.path not in current.split(":"):
        env["LD_PRELOAD"] = f"{info.path}:{current}" if current else info.path
    if "openblas" in Path(info.path).name and "OPENBLAS_CORETYPE" in os.environ:
        env.setdefault("OPENBLAS_CORETYPE", os.environ["OPENBLAS_CORETYPE"])
    if "mkl" in Path(info.path).name:
        for name, value in SPIN_ENV.items():
            env.setdefault(name, os.environ.get(name, value))
    return env


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
    if "OPENBLAS_CORETYPE" in os.environ or platform.machine() not in ("x86_64", "AMD64"):
        return
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


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
