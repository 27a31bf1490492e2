"""The embeddings server's compiled kernels against planted and broken libraries.

Loading a shared library runs its constructors inside the server, so only a library of the
user's own (owned by them, writable by nobody else, in a folder with the same properties, its
bytes matching the checksum recorded when it was built and checked) is loaded; anything else is
rebuilt, or the server keeps MLX's own kernels and says so. Each case runs ``kernels.load()`` in
a fresh interpreter (MLX is never imported into the test process) with its own
``XDG_CACHE_HOME``; the tests run as root, so owners and modes are set, not denied.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_root

from mlx_stack.embeddings.cpu import kernels

REPO = Path(__file__).resolve().parents[2]
STRANGER = 54321

LOAD = """\
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from mlx_stack.embeddings.cpu import kernels
k = kernels.load()
print("RESULT", k.path if k else None)
"""

#: A library a local attacker plants: its constructor runs as soon as it is loaded.
PLANTED = """\
#include <cstdio>
__attribute__((constructor)) static void planted() {
    FILE* f = std::fopen("%s", "a");
    if (f) { std::fputs("planted code ran\\n", f); std::fclose(f); }
}
"""

#: Every function Kernels binds, doing nothing: it loads, then fails its self-check.
STUB = "\n".join(f'extern "C" void mlxs_{name}() {{}}' for name in
                 ("softmax", "bias_add", "bias_gelu", "add_layernorm", "swiglu", "attention"))


def compile_library(source: str, out: Path) -> Path:
    src = out.with_suffix(".cpp")
    src.write_text(source)
    subprocess.run(["g++", "-shared", "-fPIC", str(src), "-o", str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


def plant(cache: Path, library: Path, compiler: str, owner: int | None = None,
          mode: int = 0o700) -> Path:
    """Put ``library`` where the server looks for its kernels, with a matching checksum."""
    folder = cache / "mlx-stack" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    (cache / "mlx-stack").chmod(0o700)
    target = folder / kernels.library_name(kernels.read_source(), compiler)
    target.write_bytes(library.read_bytes())
    sums = target.with_name(target.name + ".sha256")
    sums.write_text(hashlib.sha256(target.read_bytes()).hexdigest() + "\n")
    for f in (target, sums):
        f.chmod(mode)
        if owner is not None:
            os.chown(f, owner, owner)
    return target


def load(cache: Path, compiler: str) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache), "CXX": compiler}
    res = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr  # never a crash, whatever the library
    assert "Traceback" not in res.stderr, res.stderr
    result = next(line for line in res.stdout.splitlines() if line.startswith("RESULT"))
    return result.removeprefix("RESULT "), res.stderr


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "planted-ran"
    return compile_library(PLANTED % marker, tmp_path / "planted.so"), marker


def test_the_plant_runs_when_it_is_trusted(tmp_path, planted):
    """The control: a library of the user's own with its checksum is loaded (and this one
    lacks the kernels, so the server falls back to MLX's instead of failing)."""
    library, marker = planted
    plant(tmp_path / "cache", library, "false")
    path, log = load(tmp_path / "cache", "false")
    assert marker.exists()
    assert path == "None"
    assert "not using the cached CPU kernels" in log and "lacks a kernel" in log
    assert "fast CPU kernels unavailable, using MLX's" in log


@needs_root
@pytest.mark.parametrize("owner, mode, why", [
    (STRANGER, 0o755, f"it belongs to uid {STRANGER}, not to you (root)"),
    (None, 0o775, f"the group {STRANGER} can write it (mode 0775)"),
], ids=["another user's", "group-writable"])
def test_a_planted_library_is_not_loaded_but_rebuilt(tmp_path, planted, owner, mode, why):
    library, marker = planted
    cache = tmp_path / "cache"
    target = plant(cache, library, "g++", owner, mode)
    if owner is None:
        os.chown(target, -1, STRANGER)  # a group that is not the user's own
    path, log = load(cache, "g++")
    assert not marker.exists()
    assert f"not using the cached CPU kernels {target}: " in log
    assert f"{why}; building them again" in log
    assert path == str(target)
    st = target.stat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0  # our own build replaced it
    assert load(cache, "g++") == (str(target), "")  # and is used as is from now on


def test_a_truncated_library_is_not_loaded_and_the_server_keeps_mlx(tmp_path):
    """dlopen does not refuse a truncated library: the process would die of SIGBUS."""
    cache = tmp_path / "cache"
    good = compile_library(kernels.read_source(), tmp_path / "kernels.so")
    target = plant(cache, good, "false")
    target.write_bytes(good.read_bytes()[:2000])  # damaged after its checksum was recorded
    path, log = load(cache, "false")
    assert path == "None"
    assert "differ from the checksum recorded at build time" in log
    assert "fast CPU kernels unavailable, using MLX's: false failed to build" in log


def test_a_library_that_fails_its_self_check_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    plant(cache, compile_library(STUB, tmp_path / "stub.so"), "false")
    path, log = load(cache, "false")
    assert path == "None" and "kernel is off by" in log


@needs_root
def test_without_a_private_cache_folder_the_build_is_for_this_process_only(tmp_path):
    cache = tmp_path / "cache"
    (cache / "mlx-stack" / "kernels").mkdir(parents=True)
    os.chown(cache / "mlx-stack", STRANGER, STRANGER)
    path, log = load(cache, "g++")
    assert "no private cache folder for the CPU kernels" in log
    assert f"belongs to uid {STRANGER}" in log and "building them for this process only" in log
    assert Path(path).name == "kernels.so" and "/mlxs-kernels-" in path
    assert not Path(path).parent.parent.exists()  # removed once loaded
    assert not list((cache / "mlx-stack" / "kernels").iterdir())  # nothing left in theirs
