"""The BLAS is chosen by measurement, for real: timing children on the libraries in this venv
(MKL from the ``mkl`` wheel, OpenBLAS 0.3.15 inside ``opencv_python.libs``), and the real
embeddings server started twice on one empty cache folder.

What is checked: each library is timed in its own process and named by its own version call; a
file that is no library is skipped with the reason; the whole measurement keeps to its budget;
the server's first start measures and caches, the second reads the cache; the library
``/v1/models`` names is the one mapped into the server process (``/proc/<pid>/maps``), and the
other is not; a chat tier's server loads the choice measured on its own model's shapes.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from embedserver import child_env, minilm_path, running_server, stop

from mlx_stack.embeddings.cpu import blas
from mlx_stack.embeddings.cpu.blaschoice import shapes_from_config, shapes_of
from mlx_stack.embeddings.cpu.blasmeasure import measure

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                       reason="the mkl wheel and opencv's OpenBLAS: Linux x86_64 only"),
]  # fmt: skip


def venv_libraries() -> list[str]:
    """The two libraries the venv must hold (a missing one fails: nothing to choose between)."""
    found = blas._unique(blas.candidate_paths())
    mkl = [p for p in found if "libmkl_rt" in p]
    openblas = [p for p in found if "opencv_python.libs" in p]
    assert mkl and openblas, f"expected MKL and opencv's OpenBLAS in the venv, found {found}"
    return [mkl[0], openblas[0]]


def test_each_library_is_timed_in_its_own_process() -> None:
    paths = venv_libraries()
    result = measure(paths, shapes_of(minilm_path()))
    assert result.skipped == {}
    assert sorted(result.timings) == sorted(paths) and result.rounds >= 1
    names = {Path(p).name: t.name for p, t in result.timings.items()}
    assert names[Path(paths[0]).name].startswith("MKL 20")
    assert names[Path(paths[1]).name].startswith("OpenBLAS 0.3.15")
    for timing in result.timings.values():  # 256 rows cost more than 8 rows on every library
        assert 0 < timing.short_ms < timing.batch_ms


def test_a_broken_library_is_skipped_with_the_reason(tmp_path: Path) -> None:
    fake = tmp_path / "libopenblas-fake.so"
    fake.write_text("not a shared object\n")
    paths = [venv_libraries()[1], str(fake)]
    result = measure(paths, shapes_of(minilm_path()))
    assert list(result.timings) == [paths[0]]
    assert result.skipped[str(fake)].startswith("does not load, or has no cblas_sgemm")


def test_the_measurement_keeps_to_its_budget() -> None:
    """A 4096-wide model's batch products take far longer than the budget on 2 cores: the
    libraries still warming up are skipped as timed out, and no child is left behind."""
    wide = shapes_from_config({"hidden_size": 4096, "intermediate_size": 14336,
                               "num_attention_heads": 32})  # fmt: skip
    started = time.monotonic()
    result = measure(venv_libraries(), wide, budget=0.5)
    assert time.monotonic() - started < 3.0  # the budget plus killing the children
    assert all("timed out" in why for why in result.skipped.values()), result.skipped
    assert result.skipped, "a 4096-wide warm-up fitted in 0.5 s: make the shapes wider"


def models_card(server: Any) -> dict[str, Any]:
    with server.client() as http:
        return http.get("/v1/models").json()["data"][0]  # type: ignore[no-any-return]


def mapped(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.split()[-1].startswith("/")}  # fmt: skip


def test_the_server_measures_once_then_reads_the_cache_and_loads_what_it_names(
    tmp_path: Path,
) -> None:
    libraries = venv_libraries()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MLX_STACK_BLAS": "",
           "LD_PRELOAD": ""}  # fmt: skip
    cards, maps = [], []
    for run in ("first", "second"):
        with running_server(tmp_path / f"{run}.log", "--engine", "mlx", env=env) as server:
            cards.append(models_card(server))
            maps.append(mapped(server.process.pid))
            log = server.log.read_text()
        assert "BLAS: " in log and cards[-1]["blas_choice"]["reason"] in log
    first, second = (card["blas_choice"] for card in cards)
    assert first["from_cache"] is False and second == {**first, "from_cache": True}
    assert sorted(first["measured_ms"]) == sorted(libraries) and first["skipped"] == {}
    assert first["reason"].startswith("measured ") and "8-row products" in first["reason"]
    timings = first["measured_ms"]
    fastest = min(timings, key=lambda p: timings[p]["short_ms"])
    best_batch = min(t["batch_ms"] for t in timings.values())
    if timings[fastest]["batch_ms"] <= 1.5 * best_batch:
        assert first["path"] == fastest  # the rule, applied to what it measured
    chosen, other = first["path"], next(p for p in libraries if p != first["path"])
    assert first["library"] == timings[chosen]["name"]
    for card, loaded in zip(cards, maps, strict=True):
        assert card["blas"].startswith(f"{first['library']} ({chosen})")
        assert Path(chosen).resolve().as_posix() in {Path(p).resolve().as_posix() for p in loaded}
        assert not any(Path(p).name == Path(other).name for p in loaded), "both BLAS mapped"
    stored = tmp_path / "cache" / "mlx-stack" / "blas" / f"{first['key']}.json"
    assert json.loads(stored.read_text())["path"] == chosen
    assert stored.stat().st_mode & 0o077 == 0


def test_a_chat_tier_loads_the_choice_measured_on_its_own_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The real chat wrapper (``python -m mlx_stack.chat``, mlx_lm.server behind the guard)
    measures on its model's shapes before MLX loads, and maps that library, no other; the
    supervisor's plan sets no ``LD_PRELOAD`` on any MLX child (it would override the choice)."""
    from mlx_stack.config.plan import _mlx_child_env
    from mlx_stack.ports import free_port

    assert "LD_PRELOAD" not in _mlx_child_env()
    env = {**child_env(), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HOME": str(tmp_path)}
    env.pop("MLX_STACK_BLAS", None)
    env.pop("LD_PRELOAD", None)
    log = tmp_path / "chat.log"
    command = [sys.executable, "-m", "mlx_stack.chat", "--model", str(tiny_model),
               "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Starting httpd" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        stop(process)
    stored = list((tmp_path / "cache" / "mlx-stack" / "blas").glob("*.json"))
    assert len(stored) == 1, stored
    card = json.loads(stored[0].read_text())
    assert card["shapes"].startswith(shapes_of(tiny_model).describe().split(",")[0])
    chosen = Path(card["path"]).resolve().as_posix()
    mapped = {Path(line.split()[-1]).resolve().as_posix() for line in maps.splitlines()
              if "libmkl_rt" in line or "libopenblas" in line}  # fmt: skip
    assert mapped == {chosen}, (mapped, chosen)
    first = log.read_text(errors="replace").splitlines()[0]
    assert first.startswith(f"mlx-stack chat: BLAS {card['library']} ") and " ms" in first, first


def test_two_servers_starting_together_measure_once(tmp_path: Path) -> None:
    """Replicas start at the same moment: one times the libraries, the other waits for the
    cache folder's lock and reads its result (no two measurements slowing each other)."""
    code = ("import json, sys\nfrom pathlib import Path\n"
            "from mlx_stack.embeddings.cpu import blas\n"
            "print(json.dumps(blas.choose(Path(sys.argv[1])).card()))\n")  # fmt: skip
    env = {**child_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MLX_STACK_BLAS", None)
    runs = [subprocess.Popen([sys.executable, "-c", code, str(minilm_path())], env=env,
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    cards = [json.loads(run.communicate(timeout=60)[0]) for run in runs]
    assert sorted(card["from_cache"] for card in cards) == [False, True]
    assert cards[0]["path"] == cards[1]["path"] and cards[0]["key"] == cards[1]["key"]
