"""Choosing the embeddings engine, on fakes: no model, no MLX, no ONNX Runtime session.

The rules (``engine/choice.py``) as tables, the cache as files in a temporary folder, and the
whole flow (``engine/select.choose_and_load``) with fake loaders and a fake stopwatch: which
engines get loaded, which get measured, what is cached and read back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlx_stack.embeddings.engine.choice import (
    ChoiceCache,
    EngineChoice,
    EngineError,
    Machine,
    Timing,
    choice_key,
    decide,
    mode_from,
    plan,
)
from mlx_stack.embeddings.engine.select import choose_and_load
from mlx_stack.embeddings.model.pooling import pool

CPU = Machine("AMD EPYC", ("avx", "avx2", "fma"), metal=False,
              versions={"mlx": "0.32", "onnxruntime": "1.32", "blas": "MKL 2026.2"})  # fmt: skip
MAC = Machine("Apple M3", ("neon",), metal=True, versions={"mlx": "0.32"})
SHA = "ab" * 32


# --- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "machine", "problem", "engine", "says"),
    [
        ("mlx", CPU, None, "mlx", "forced"),
        ("onnx", CPU, None, "onnx", "forced"),
        ("mlx", CPU, "architecture qwen3", "mlx", "forced"),
        ("auto", MAC, None, "mlx", "Metal"),
        ("onnx", MAC, None, "onnx", "forced"),  # the operator's word wins, even on a Mac
        ("auto", CPU, "architecture qwen3 (the ONNX engine builds bert)", "mlx", "qwen3"),
        ("auto", MAC, "architecture qwen3", "mlx", "Metal"),
    ],
)
def test_plan_without_measuring(mode: Any, machine: Machine, problem: str | None, engine: str,
                                says: str) -> None:  # fmt: skip
    choice = plan(mode, machine, problem)
    assert choice is not None and choice.engine == engine and says in choice.reason
    assert not choice.measured


def test_auto_on_a_cpu_with_a_supported_model_measures() -> None:
    assert plan("auto", CPU, None) is None


def test_forcing_onnx_on_an_unsupported_model_says_why_and_what_to_do() -> None:
    with pytest.raises(EngineError, match=r"qwen3.*use --engine mlx or auto"):
        plan("onnx", CPU, "architecture qwen3")


@pytest.mark.parametrize(
    ("measured", "engine", "says"),
    [
        ({"mlx": Timing(14.0, 200.0), "onnx": Timing(4.4, 170.0)}, "onnx", "4.4 ms; mlx 14.0"),
        ({"mlx": Timing(3.0, 100.0), "onnx": Timing(4.4, 120.0)}, "mlx", "fastest"),
        # faster on a short query but over 1.5x slower on a batch: the other one
        ({"mlx": Timing(9.0, 100.0), "onnx": Timing(4.0, 151.0)}, "mlx", "onnx was faster"),
        ({"mlx": Timing(9.0, 100.0), "onnx": Timing(4.0, 150.0)}, "onnx", "fastest"),
        ({"onnx": Timing(4.0, 150.0)}, "onnx", "4.0 ms"),
    ],
)
def test_decide(measured: dict[str, Timing], engine: str, says: str) -> None:
    choice = decide(measured)
    assert choice.engine == engine and says in choice.reason
    assert dict(choice.measured) == measured


def test_decide_needs_a_measurement() -> None:
    with pytest.raises(ValueError, match="nothing measured"):
        decide({})


def test_the_key_changes_with_the_model_the_cpu_and_each_library() -> None:
    base = choice_key(SHA, CPU)
    assert choice_key(SHA, CPU) == base
    assert choice_key("cd" * 32, CPU) != base
    assert choice_key(SHA, Machine("Intel Xeon", CPU.flags, False, CPU.versions)) != base
    assert choice_key(SHA, Machine(CPU.cpu, (*CPU.flags, "avx512f"), False, CPU.versions)) != base
    for library in ("mlx", "onnxruntime", "blas"):
        versions = {**CPU.versions, library: "other"}
        assert choice_key(SHA, Machine(CPU.cpu, CPU.flags, False, versions)) != base


@pytest.mark.parametrize(
    ("flag", "env", "mode"),
    [(None, {}, "auto"), ("onnx", {}, "onnx"), (None, {"MLX_STACK_ENGINE": "MLX"}, "mlx"),
     ("auto", {"MLX_STACK_ENGINE": "mlx"}, "auto"), (None, {"MLX_STACK_ENGINE": " "}, "auto")],
)  # fmt: skip
def test_mode_from_the_flag_then_the_environment(flag: str | None, env: dict[str, str],
                                                 mode: str) -> None:  # fmt: skip
    assert mode_from(flag, env) == mode


def test_a_bad_mode_names_its_source_and_the_choices() -> None:
    with pytest.raises(EngineError, match=r"MLX_STACK_ENGINE='torch': use one of auto, mlx, onnx"):
        mode_from(None, {"MLX_STACK_ENGINE": "torch"})


# --- the cache -----------------------------------------------------------------------------


def test_the_cache_round_trips_and_is_private(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path / "engine")
    key = choice_key(SHA, CPU)
    assert cache.read(key) is None
    choice = EngineChoice("onnx", "measured", {"mlx": Timing(14, 200), "onnx": Timing(4, 170)},
                          key=key)  # fmt: skip
    cache.write(choice, CPU)
    back = cache.read(key)
    assert back == EngineChoice("onnx", "measured", choice.measured, cached=True, key=key)
    stored = tmp_path / "engine" / f"{key}.json"
    assert stored.stat().st_mode & 0o077 == 0
    data = json.loads(stored.read_text())
    assert data["cpu"] == "AMD EPYC (avx/avx2/fma)" and data["versions"]["blas"] == "MKL 2026.2"
    assert [e["engine"] for e in cache.entries()] == ["onnx"]


@pytest.mark.parametrize("text", ["", "{", "[]", '{"engine": "torch", "reason": "x", '
                                  '"measured": {}}', '{"engine": "mlx"}'])  # fmt: skip
def test_a_damaged_cache_entry_is_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / "k.json").write_text(text)
    assert ChoiceCache(tmp_path).read("k") is None


def test_no_cache_folder_means_no_cache() -> None:
    cache = ChoiceCache(None)
    cache.write(EngineChoice("mlx", "x", key="k"), CPU)
    assert cache.read("k") is None and cache.entries() == []


# --- the flow, with fake engines -----------------------------------------------------------


@dataclass
class FakeEncoder:
    engine: str
    engine_choice: EngineChoice | None = None


@dataclass
class Bench:
    """Fake loaders and stopwatch: records what was loaded and measured."""

    timings: dict[str, Timing]
    loaded: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)

    broken: tuple[str, ...] = ()

    def load(self, engine: str) -> FakeEncoder:
        self.loaded.append(engine)
        if engine in self.broken:
            raise RuntimeError(f"{engine} cannot load this")
        return FakeEncoder(engine)

    def time(self, encoder: FakeEncoder) -> Timing:
        self.measured.append(encoder.engine)
        return self.timings[encoder.engine]

    def run(self, cache: ChoiceCache, mode: Any = "auto", machine: Machine = CPU,
            problem: str | None = None) -> FakeEncoder:  # fmt: skip
        encoder: FakeEncoder = choose_and_load(mode, machine, problem, SHA, cache, self.load,
                                               self.time)  # fmt: skip
        return encoder


FAST_ONNX = {"mlx": Timing(14.0, 200.0), "onnx": Timing(4.4, 170.0)}


def test_first_start_measures_both_then_the_cache_loads_one(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path)
    first = Bench(FAST_ONNX)
    encoder = first.run(cache)
    assert sorted(first.loaded) == ["mlx", "onnx"]
    assert first.measured == ["mlx", "onnx"] * 3  # in turn, round after round
    assert encoder.engine == "onnx" and encoder.engine_choice is not None
    assert not encoder.engine_choice.cached and encoder.engine_choice.key == choice_key(SHA, CPU)
    again = Bench({})  # would fail if asked to measure
    encoder = again.run(cache)
    assert again.loaded == ["onnx"] and again.measured == []
    assert encoder.engine_choice is not None and encoder.engine_choice.cached
    assert encoder.engine_choice.measured == FAST_ONNX


def test_another_machine_measures_again(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path)
    Bench(FAST_ONNX).run(cache)
    other = Machine("Intel Xeon", ("avx512f",), False, CPU.versions)
    bench = Bench({"mlx": Timing(3.0, 90.0), "onnx": Timing(4.0, 100.0)})
    assert bench.run(cache, machine=other).engine == "mlx"
    assert sorted(set(bench.measured)) == ["mlx", "onnx"] and len(cache.entries()) == 2


@pytest.mark.parametrize(
    ("mode", "machine", "problem", "engine"),
    [("mlx", CPU, None, "mlx"), ("onnx", CPU, None, "onnx"), ("auto", MAC, None, "mlx"),
     ("auto", CPU, "architecture gemma3_text", "mlx")],
)  # fmt: skip
def test_forced_metal_and_unsupported_load_one_engine_and_measure_nothing(
    tmp_path: Path, mode: Any, machine: Machine, problem: str | None, engine: str
) -> None:
    bench = Bench({})
    encoder = bench.run(ChoiceCache(tmp_path), mode, machine, problem)
    assert bench.loaded == [engine] and bench.measured == [] and encoder.engine == engine
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing cached


def test_a_forced_engine_ignores_a_cached_choice(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path)
    Bench(FAST_ONNX).run(cache)
    bench = Bench({})
    assert bench.run(cache, mode="mlx").engine == "mlx" and bench.loaded == ["mlx"]


def test_an_onnx_engine_that_fails_to_load_leaves_auto_on_mlx(tmp_path: Path) -> None:
    bench = Bench(FAST_ONNX, broken=("onnx",))
    encoder = bench.run(ChoiceCache(tmp_path))
    assert encoder.engine == "mlx" and bench.measured == []
    assert encoder.engine_choice is not None
    assert encoder.engine_choice.reason == ("the ONNX engine failed to load: RuntimeError: onnx "
                                            "cannot load this")  # fmt: skip
    assert list(tmp_path.glob("*.json")) == []  # not cached: the next start tries again


def test_a_cached_onnx_choice_that_fails_to_load_falls_back_to_mlx(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path)
    Bench(FAST_ONNX).run(cache)
    bench = Bench({}, broken=("onnx",))
    encoder = bench.run(cache)
    assert bench.loaded == ["onnx", "mlx"] and encoder.engine == "mlx"
    assert encoder.engine_choice is not None and "failed to load" in encoder.engine_choice.reason


def test_a_forced_onnx_engine_that_fails_to_load_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="onnx cannot load this"):
        Bench({}, broken=("onnx",)).run(ChoiceCache(tmp_path), mode="onnx")


def test_the_choice_takes_the_median_of_the_rounds(tmp_path: Path) -> None:
    """One slow round (a busy moment) does not decide."""
    rounds = iter([Timing(9.0, 100), Timing(4.0, 100), Timing(50.0, 100), Timing(4.0, 100),
                   Timing(9.0, 100), Timing(4.0, 100)])  # mlx, onnx, mlx (busy), ...  # fmt: skip
    encoder = choose_and_load("auto", CPU, None, SHA, ChoiceCache(tmp_path), FakeEncoder,
                              lambda _: next(rounds))  # fmt: skip
    assert encoder.engine == "onnx"
    assert encoder.engine_choice is not None
    assert encoder.engine_choice.measured == {"mlx": Timing(9.0, 100), "onnx": Timing(4.0, 100)}


# --- pooling: one definition for both engines ----------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_on_numpy_reads_only_real_tokens(pooling: str) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    got = pool(hidden, mask, pooling, np)
    want = {
        "cls": hidden[:, 0],
        "last": np.stack([hidden[0, 3], hidden[1, 1]]),
        "mean": np.stack([hidden[0].mean(axis=0), hidden[1, :2].mean(axis=0)]),
    }[pooling]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --- what the ONNX graph builder takes -----------------------------------------------------

BERT = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"model_type": "qwen3"}, "model_type 'qwen3'"),
        ({"model_type": "nomic_bert"}, "model_type 'nomic_bert'"),
        ({"quantization": {"bits": 4, "group_size": 64}}, "MLX-quantised"),
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
        ({"position_embedding_type": "relative_key"}, "relative_key"),
        ({"num_attention_heads": 5}, "not divisible"),
    ],
)
def test_what_the_graph_builder_refuses(change: dict[str, Any], problem: str) -> None:
    from mlx_stack.embeddings.engine.onnxgraph import EncoderShape, OnnxUnsupported

    with pytest.raises(OnnxUnsupported, match=problem):
        EncoderShape.from_config({**BERT, **change})


def test_xlm_roberta_positions_start_after_the_padding_id() -> None:
    from mlx_stack.embeddings.engine.onnxgraph import EncoderShape

    assert EncoderShape.from_config(BERT).position_offset == 0
    roberta = EncoderShape.from_config({**BERT, "model_type": "xlm-roberta", "pad_token_id": 1})
    assert roberta.model_type == "xlm_roberta" and roberta.position_offset == 2


# --- what doctor says ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "machine", "onnxruntime", "entries", "ok", "says"),
    [
        ("auto", MAC, "1.32", [], True, "Metal"),
        ("mlx", CPU, "1.32", [], True, "mlx, forced by MLX_STACK_ENGINE"),
        ("auto", CPU, "absent", [], False, "onnxruntime is not installed"),
        ("auto", CPU, "1.32", [], True, "nothing measured yet"),
        ("auto", CPU, "1.32", [{"engine": "onnx", "cpu": "AMD EPYC", "content_sha256": SHA,
                                "measured": {"onnx": {"short_ms": 4.4, "batch_ms": 170}}}],
         True, "last measured onnx for model abababababab on AMD EPYC (short query: onnx 4.4 ms)"),
    ],
)  # fmt: skip
def test_the_doctor_line(mode: Any, machine: Machine, onnxruntime: str,
                         entries: list[dict[str, Any]], ok: bool, says: str) -> None:  # fmt: skip
    from mlx_stack.embeddings.engine.choice import summary

    well, detail, fix = summary(mode, machine, onnxruntime, entries)
    assert well is ok and says in detail and (fix == "") is ok


def _replica(cache: ChoiceCache, bench: Bench, results: list[Any]) -> None:
    results.append(bench.run(cache))


class SlowBench(Bench):
    """Measuring takes a while, as on a real machine: replicas started together overlap."""

    def time(self, encoder: FakeEncoder) -> Timing:
        time.sleep(0.05)
        return super().time(encoder)


def test_replicas_starting_together_measure_once(tmp_path: Path) -> None:
    """Two replicas (threads: flock is per open file, so they contend as processes do): the
    first measures, the other waits for its result and loads one engine."""
    benches = [SlowBench(FAST_ONNX), SlowBench(FAST_ONNX)]
    results: list[Any] = []
    threads = [threading.Thread(target=_replica, args=(ChoiceCache(tmp_path), b, results))
               for b in benches]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 2 and {r.engine for r in results} == {"onnx"}
    measuring = [b for b in benches if b.measured]
    assert len(measuring) == 1 and measuring[0].measured == ["mlx", "onnx"] * 3
    waiter = next(b for b in benches if not b.measured)
    assert waiter.loaded == ["onnx"]
    assert sorted(r.engine_choice.cached for r in results) == [False, True]


def test_a_waiter_past_its_wait_measures_itself(tmp_path: Path) -> None:
    holder = ChoiceCache(tmp_path)
    assert holder.read("k") is None  # claimed, never written (a replica stuck measuring)
    waiter = ChoiceCache(tmp_path, wait_s=0.2)
    started = time.monotonic()
    assert waiter.read("k") is None
    assert time.monotonic() - started >= 0.2
    waiter.release("k")  # it held nothing: a no-op
    holder.release("k")
    third = ChoiceCache(tmp_path, wait_s=0.0)
    assert third.read("k") is None and "k" in third._held  # free again: claimed at once
    third.release("k")


def test_a_replica_that_measured_nothing_releases_its_claim(tmp_path: Path) -> None:
    Bench(FAST_ONNX, broken=("onnx",)).run(ChoiceCache(tmp_path))
    other = ChoiceCache(tmp_path, wait_s=0.0)
    assert other.read(choice_key(SHA, CPU)) is None
    assert choice_key(SHA, CPU) in other._held  # not left locked by the first
    other.release(choice_key(SHA, CPU))
