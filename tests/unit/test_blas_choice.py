"""Choosing MLX's BLAS, on fakes: no library loaded, no timing child started.

The rule (``cpu/blaschoice.decide``) as a table, the shapes read from config.json, the cache key
(it must change with the CPU, its flags, a library file and the shapes), the cache as files in a
temporary folder (a corrupt one is measured again), and the whole flow
(``choose_library``) with a fake timer that records what it was asked to time.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_stack.embeddings.cpu.blas import BlasInfo
from mlx_stack.embeddings.cpu.blaschoice import (
    BlasCache,
    BlasChoice,
    Candidate,
    Host,
    LibTiming,
    Measurement,
    ShapeError,
    Shapes,
    choice_key,
    choose_library,
    decide,
    shapes_from_config,
)

HOST = Host("AMD EPYC", ("avx", "avx2", "fma"), 2)
MKL = Candidate("/venv/lib/libmkl_rt.so.3", 15_734_272, 1)
OPENBLAS = Candidate("/venv/opencv_python.libs/libopenblasp-r0.3.15.so", 30_000_000, 2)
MINILM = {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536,
          "num_attention_heads": 12}  # fmt: skip
SHAPES = shapes_from_config(MINILM)


def timing(name: str, short: float, batch: float) -> LibTiming:
    return LibTiming(name, short, batch)


# --- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mkl", "openblas", "chosen", "says"),
    [
        ((0.35, 10.0), (0.21, 11.0), "OpenBLAS", "measured 0.21 ms vs MKL 0.35 ms on this "
                                                 "model's 8-row products"),
        ((0.20, 10.0), (0.21, 9.0), "MKL", "measured 0.20 ms vs OpenBLAS 0.21 ms"),
        # faster on short rows but over 1.5x slower on the batch: the other one
        ((0.10, 16.0), (0.21, 10.0), "OpenBLAS", "MKL was faster on this model's 8-row products"
                                                 " (0.10 vs 0.21 ms) but took 16.0 ms against"
                                                 " 10.0 ms on 256-row ones (over 1.5x)"),
        # 1.5x exactly is still within the tolerance
        ((0.10, 15.0), (0.21, 10.0), "MKL", "measured 0.10 ms"),
    ],
)
def test_the_rule(mkl: tuple[float, float], openblas: tuple[float, float], chosen: str,
                  says: str) -> None:  # fmt: skip
    measured = {MKL.path: timing("MKL", *mkl), OPENBLAS.path: timing("OpenBLAS", *openblas)}
    choice = decide(measured, SHAPES)
    assert choice.name == chosen and says in choice.reason, choice.reason
    assert choice.path == (MKL.path if chosen == "MKL" else OPENBLAS.path)
    assert choice.measured == measured and not choice.cached


def test_the_rule_needs_a_measurement() -> None:
    with pytest.raises(ValueError, match="nothing measured"):
        decide({}, SHAPES)


# --- the shapes ----------------------------------------------------------------------------


def test_shapes_of_bert_qwen3_nomic_and_a_nested_text_config() -> None:
    assert SHAPES.products == ((384, 384),) * 4 + ((384, 1536), (1536, 384))
    assert (SHAPES.short_rows, SHAPES.batch_rows) == (8, 256)
    qwen3 = shapes_from_config({"hidden_size": 1024, "intermediate_size": 3072,
                                "num_attention_heads": 16, "num_key_value_heads": 8,
                                "head_dim": 128})  # fmt: skip
    assert qwen3.products[:4] == ((1024, 2048), (1024, 1024), (1024, 1024), (2048, 1024))
    assert 32 <= qwen3.batch_rows < 256  # a wide model's batch is cut to stay within the budget
    nomic = shapes_from_config({"n_embd": 768, "n_inner": 3072, "n_head": 12})
    assert nomic.products[-2:] == ((768, 3072), (3072, 768))
    nested = shapes_from_config({"model_type": "gemma3", "text_config": MINILM})
    assert nested == SHAPES


def test_a_huge_model_is_timed_on_capped_widths() -> None:
    shapes = shapes_from_config({"hidden_size": 8192, "intermediate_size": 28672,
                                 "num_attention_heads": 64})  # fmt: skip
    assert all(k * n <= 1 << 26 for k, n in shapes.products)
    assert shapes.batch_rows == 32


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"model_type": "bert"}, "no hidden_size or n_embd"),
        ({"hidden_size": "384"}, "hidden_size='384' is not a positive integer"),
        ({"hidden_size": 384, "intermediate_size": -1}, "intermediate_size=-1"),
        ({"hidden_size": True}, "hidden_size=True"),
    ],
)
def test_bad_configs_say_which_field(config: dict[str, object], says: str) -> None:
    with pytest.raises(ShapeError, match=says):
        shapes_from_config(config)


# --- the cache key -------------------------------------------------------------------------


def test_the_key_changes_with_cpu_flags_library_and_shapes() -> None:
    key = choice_key(HOST, [MKL, OPENBLAS], SHAPES)
    assert key == choice_key(Host("AMD EPYC", ("avx", "avx2", "fma"), 2), [MKL, OPENBLAS],
                             shapes_from_config(dict(MINILM)))  # fmt: skip
    others = [
        choice_key(replace(HOST, cpu="Intel Xeon"), [MKL, OPENBLAS], SHAPES),
        choice_key(replace(HOST, flags=(*HOST.flags, "avx512f")), [MKL, OPENBLAS], SHAPES),
        choice_key(replace(HOST, cores=4), [MKL, OPENBLAS], SHAPES),
        choice_key(replace(HOST, threads={"OPENBLAS_NUM_THREADS": "1"}), [MKL, OPENBLAS], SHAPES),
        choice_key(HOST, [replace(MKL, size=MKL.size + 1), OPENBLAS], SHAPES),
        choice_key(HOST, [replace(MKL, mtime_ns=9), OPENBLAS], SHAPES),
        choice_key(HOST, [MKL, replace(OPENBLAS, path="/usr/lib/libopenblas.so.0")], SHAPES),
        choice_key(HOST, [MKL], SHAPES),
        choice_key(HOST, [MKL, OPENBLAS], shapes_from_config({**MINILM, "hidden_size": 768})),
        choice_key(HOST, [MKL, OPENBLAS], replace(SHAPES, batch_rows=128)),
    ]
    assert key not in others and len(set(others)) == len(others)


# --- the cache -----------------------------------------------------------------------------


def measured_choice(key: str) -> BlasChoice:
    return replace(decide({MKL.path: timing("MKL 2026.2", 0.35, 10.0),
                           OPENBLAS.path: timing("OpenBLAS 0.3.15 (Haswell)", 0.21, 11.0)},
                          SHAPES), key=key, skipped={"/x.so": "exited"})  # fmt: skip


def test_the_cache_round_trips_privately(tmp_path: Path) -> None:
    cache = BlasCache(tmp_path / "blas")
    choice = measured_choice("k1")
    cache.write(choice, HOST)
    stored = tmp_path / "blas" / "k1.json"
    assert stored.stat().st_mode & 0o077 == 0
    assert json.loads(stored.read_text())["cpu"] == "AMD EPYC (avx/avx2/fma), 2 cores"
    assert cache.read("k1") == replace(choice, cached=True)
    assert cache.read("k2") is None
    assert [e["key"] for e in cache.entries()] == ["k1"]


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", '{"path": "/a"}', '{"path": "/a", "library": "A", "reason": "r", '
     '"measured_ms": {"/b": {"name": "B", "short_ms": 1, "batch_ms": 2}}}',
     '{"path": "/a", "library": "A", "reason": "r", "measured_ms": {"/a": {"name": "A"}}}',
     '{"path": "/a", "library": "A", "reason": "r", "measured_ms": '
     '{"/a": {"name": "A", "short_ms": "fast", "batch_ms": 2}}}'],
)
def test_a_corrupt_cache_file_is_measured_again(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "k.json").write_text(text)
    assert BlasCache(tmp_path).read("k") is None
    assert "ignoring the BLAS choice cached" in caplog.text
    timer = FakeTimer()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MINILM))
    key = choice_key(HOST, [MKL, OPENBLAS], SHAPES)
    (tmp_path / f"{key}.json").write_text(text)
    choice = choose_library(tmp_path / "model", "", [MKL, OPENBLAS], HOST, BlasCache(tmp_path),
                            timer)  # fmt: skip
    assert timer.calls == [[MKL.path, OPENBLAS.path]] and not choice.cached
    assert BlasCache(tmp_path).read(key) == replace(choice, cached=True)  # replaced


def test_no_cache_folder_reads_nothing_and_writes_nothing() -> None:
    cache = BlasCache(None)
    cache.write(measured_choice("k"), HOST)
    assert cache.read("k") is None and cache.entries() == []


# --- the flow ------------------------------------------------------------------------------


class FakeTimer:
    """Records each call; answers with fixed medians (OpenBLAS faster) or the given result."""

    def __init__(self, result: Measurement | None = None) -> None:
        self.calls: list[list[str]] = []
        self.result = result

    def __call__(self, paths: list[str], shapes: Shapes) -> Measurement:
        self.calls.append(list(paths))
        if self.result is not None:
            return self.result
        return Measurement({MKL.path: timing("MKL 2026.2", 0.35, 10.0),
                            OPENBLAS.path: timing("OpenBLAS 0.3.15", 0.21, 11.0)},
                           rounds=3, seconds=0.5)  # fmt: skip


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MINILM))
    return folder


def test_first_start_measures_the_next_reads_the_cache(model: Path, tmp_path: Path) -> None:
    cache, timer = BlasCache(tmp_path / "cache"), FakeTimer()
    first = choose_library(model, "", [MKL, OPENBLAS], HOST, cache, timer)
    assert first.path == OPENBLAS.path and first.name == "OpenBLAS 0.3.15"
    assert not first.cached and first.key == choice_key(HOST, [MKL, OPENBLAS], SHAPES)
    second = choose_library(model, "", [MKL, OPENBLAS], HOST, cache, timer)
    assert second == replace(first, cached=True) and len(timer.calls) == 1
    # a new CPU (or library build) is a new key: measured again
    choose_library(model, "", [MKL, OPENBLAS], replace(HOST, cpu="Intel Xeon"), cache, timer)
    assert len(timer.calls) == 2


def test_a_choice_measured_on_a_busy_machine_is_measured_again_when_quiet(
    model: Path, tmp_path: Path
) -> None:
    cache, timer = BlasCache(tmp_path / "cache"), FakeTimer()
    busy = choose_library(model, "", [MKL, OPENBLAS], replace(HOST, load=1.7), cache, timer)
    assert busy.busy == 1.7 and busy.card()["load_per_core"] == 1.7
    still_busy = choose_library(model, "", [MKL, OPENBLAS], replace(HOST, load=1.2), cache, timer)
    assert still_busy.cached and len(timer.calls) == 1  # no quieter moment yet: kept
    quiet = choose_library(model, "", [MKL, OPENBLAS], replace(HOST, load=0.3), cache, timer)
    assert not quiet.cached and quiet.busy == 0.3 and len(timer.calls) == 2
    for load in (0.3, 1.9):  # measured quietly: final, whatever the load later
        assert choose_library(model, "", [MKL, OPENBLAS], replace(HOST, load=load), cache,
                              timer).cached  # fmt: skip
    assert len(timer.calls) == 2


def test_an_entry_without_its_load_is_kept(model: Path, tmp_path: Path) -> None:
    """Entries written before the load was recorded are not measured again."""
    cache, timer = BlasCache(tmp_path / "cache"), FakeTimer()
    first = choose_library(model, "", [MKL, OPENBLAS], HOST, cache, timer)
    stored = tmp_path / "cache" / f"{first.key}.json"
    data = json.loads(stored.read_text())
    del data["load_per_core"]
    stored.write_text(json.dumps(data))
    again = choose_library(model, "", [MKL, OPENBLAS], replace(HOST, load=0.1), cache, timer)
    assert again.cached and again.busy is None and len(timer.calls) == 1


def test_the_explicit_library_wins_without_measuring(model: Path, tmp_path: Path) -> None:
    timer = FakeTimer()
    choice = choose_library(model, "/opt/my/libblas.so", [MKL, OPENBLAS], HOST,
                            BlasCache(tmp_path / "cache"), timer)  # fmt: skip
    assert choice.path == "/opt/my/libblas.so" and choice.reason == "MLX_STACK_BLAS set"
    assert timer.calls == [] and not list(tmp_path.glob("cache/*.json"))


@pytest.mark.parametrize(("found", "reason"), [([MKL], "only one found"), ([], "none found")])
def test_one_library_or_none_is_not_measured(
    model: Path, tmp_path: Path, found: list[Candidate], reason: str
) -> None:
    timer = FakeTimer()
    choice = choose_library(model, "", found, HOST, BlasCache(tmp_path / "cache"), timer)
    assert choice.reason == reason and timer.calls == []
    assert choice.path == (MKL.path if found else None)


def test_without_readable_shapes_the_generic_order_says_why(tmp_path: Path) -> None:
    timer, cache = FakeTimer(), BlasCache(tmp_path / "cache")
    no_model = choose_library(None, "", [MKL, OPENBLAS], HOST, cache, timer)
    assert no_model.path == MKL.path and "no model folder" in no_model.reason
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    broken = choose_library(tmp_path / "broken", "", [MKL, OPENBLAS], HOST, cache, timer)
    assert broken.path == MKL.path and "config.json" in broken.reason
    assert "generic order" in broken.reason and timer.calls == []


def test_a_failing_candidate_is_skipped_with_its_reason(model: Path, tmp_path: Path) -> None:
    timer = FakeTimer(Measurement({MKL.path: timing("MKL 2026.2", 0.35, 10.0)},
                                  {OPENBLAS.path: "exited (exit -11)"}))  # fmt: skip
    choice = choose_library(model, "", [MKL, OPENBLAS], HOST, BlasCache(tmp_path / "c"), timer)
    assert choice.path == MKL.path and choice.skipped == {OPENBLAS.path: "exited (exit -11)"}
    assert choice.reason == "measured 0.35 ms on this model's 8-row products"
    assert choice.card()["skipped"] == {OPENBLAS.path: "exited (exit -11)"}


def test_when_nothing_could_be_timed_the_generic_order_is_uncached(
    model: Path, tmp_path: Path
) -> None:
    timer = FakeTimer(Measurement({}, {MKL.path: "timed out", OPENBLAS.path: "exited"}))
    cache = BlasCache(tmp_path / "c")
    choice = choose_library(model, "", [MKL, OPENBLAS], HOST, cache, timer)
    assert choice.path == MKL.path and choice.key is None
    assert "no library could be timed: MKL: timed out; OpenBLAS: exited" in choice.reason
    assert cache.entries() == []


def test_blas_info_says_which_and_why() -> None:
    choice = replace(measured_choice("k"), cached=True)
    info = BlasInfo("OpenBLAS 0.3.15 (Haswell)", OPENBLAS.path, choice=choice)
    assert info.describe() == (f"OpenBLAS 0.3.15 (Haswell) ({OPENBLAS.path}): measured 0.21 ms "
                               "vs MKL 2026.2 0.35 ms on this model's 8-row products "
                               "(from cache)")  # fmt: skip
    card = choice.card()
    assert card["from_cache"] is True and card["library"] == "OpenBLAS 0.3.15 (Haswell)"
    assert card["measured_ms"][MKL.path] == {"name": "MKL 2026.2", "short_ms": 0.35,
                                             "batch_ms": 10.0}  # fmt: skip


def test_candidate_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert Candidate.of(str(tmp_path / "absent.so")) is None
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"x" * 10)
    found = Candidate.of(str(lib))
    assert found is not None and found.size == 10 and found.mtime_ns == os.stat(lib).st_mtime_ns


def test_doctor_names_the_last_measured_choice_or_says_none_yet(tmp_path: Path) -> None:
    from mlx_stack.cli.doctor import _measured_blas

    assert "none yet" in _measured_blas([])
    cache = BlasCache(tmp_path)
    cache.write(measured_choice("k1"), HOST)
    line = _measured_blas(cache.entries())
    assert "last OpenBLAS 0.3.15 (Haswell) for 384x384, 384x1536, 1536x384" in line
    assert "AMD EPYC (avx/avx2/fma), 2 cores: measured 0.21 ms vs MKL 2026.2 0.35 ms" in line
    assert line.endswith("; 1 cached")
