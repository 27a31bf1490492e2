"""Pure units of the embeddings server: batching plan and loop, request parsing, metrics text,
model-folder settings, vector finishing. No MLX, no subprocess: these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import needs_root

from mlx_stack.embeddings.api.apierror import ApiError
from mlx_stack.embeddings.api.metrics import ServerMetrics
from mlx_stack.embeddings.api.protocol import MAX_INPUTS, parse_request
from mlx_stack.embeddings.cpu import kernels
from mlx_stack.embeddings.model.encoder import finish
from mlx_stack.embeddings.model.settings import ModelFolderError, resolve
from mlx_stack.embeddings.serving.batcher import (
    MAX_ROWS_PER_PASS,
    Batcher,
    BatchPolicy,
    plan_passes,
)

# --- plan_passes -----------------------------------------------------------------------------


def lengths_of(plan: list[list[int]], lengths: list[int]) -> list[list[int]]:
    return [[lengths[i] for i in rows] for rows in plan]


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ([], 2048, []),
        ([7], 2048, [[7]]),
        ([5, 5, 5, 5], 2048, [[5, 5, 5, 5]]),  # alike: one pass
        ([256, 3, 256, 9, 12], 2048, [[3, 9, 12], [256, 256]]),  # never pad 3 to 256
        ([3000], 2048, [[3000]]),  # over budget alone: still served, alone
        ([100, 100, 100], 200, [[100, 100], [100]]),  # rows x longest <= budget
    ],
)
def test_plan_passes_table(lengths: list[int], budget: int, expected: list[list[int]]) -> None:
    assert sorted(lengths_of(plan_passes(lengths, budget), lengths)) == sorted(expected)


def test_plan_passes_covers_every_item_once_within_limits() -> None:
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(2, 257, size=700)]
    plan = plan_passes(lengths, 2048)
    flat = sorted(i for rows in plan for i in rows)
    assert flat == list(range(len(lengths)))
    for rows in plan:
        longest = max(lengths[i] for i in rows)
        assert len(rows) * longest <= 2048 and len(rows) <= MAX_ROWS_PER_PASS
    padded = sum(len(rows) * max(lengths[i] for i in rows) for rows in plan)
    assert padded < 1.25 * sum(lengths)  # sorting keeps padding small


def test_plan_passes_caps_rows_for_tiny_texts() -> None:
    plan = plan_passes([2] * 2000, 8192)
    assert max(len(rows) for rows in plan) <= MAX_ROWS_PER_PASS


# --- Batcher ---------------------------------------------------------------------------------


class FakeModel:
    """forward() returns [length, first id] per row and records each pass; can be slowed."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.passes: list[list[list[int]]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        with self.lock:
            self.passes.append([list(s) for s in sequences])
        time.sleep(self.delay)
        if self.fail_on is not None and any(s[0] == self.fail_on for s in sequences):
            raise RuntimeError("boom")
        return np.array([[len(s), s[0]] for s in sequences], dtype=np.float32)


async def with_batcher(model: FakeModel, policy: BatchPolicy, body):  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(max_workers=1) as worker:
        batcher = Batcher(model.forward, worker, policy)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()


def test_batcher_returns_rows_in_request_order() -> None:
    model = FakeModel()

    async def body(batcher: Batcher) -> np.ndarray:
        return await batcher.submit([[1] * 9, [2] * 3, [3] * 300, [4] * 3])

    result = asyncio.run(with_batcher(model, BatchPolicy(), body))
    assert result.tolist() == [[9, 1], [3, 2], [300, 3], [3, 4]]
    assert sorted(len(p) for p in model.passes) == [1, 3]  # the long one alone


def test_batcher_merges_requests_that_queue_while_a_pass_runs() -> None:
    model = FakeModel(delay=0.2)

    async def body(batcher: Batcher) -> list[np.ndarray]:
        first = asyncio.create_task(batcher.submit([[1, 0]]))
        await asyncio.sleep(0.05)  # the first pass is now running
        rest = [asyncio.create_task(batcher.submit([[2] * (n + 1)])) for n in range(10)]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(with_batcher(model, BatchPolicy(), body))
    assert [r[0].tolist() for r in results] == [[2, 1]] + [[n + 1, 2] for n in range(10)]
    assert [len(p) for p in model.passes] == [1, 10]


def test_lone_request_does_not_wait_but_one_on_its_way_is_waited_for() -> None:
    model = FakeModel()
    policy = BatchPolicy(batch_timeout_ms=300)

    async def lone(batcher: Batcher) -> float:
        started = time.monotonic()
        await batcher.submit([[1, 1]])
        return time.monotonic() - started

    assert asyncio.run(with_batcher(model, policy, lone)) < 0.15

    model = FakeModel()

    async def expected(batcher: Batcher) -> None:
        async def late() -> np.ndarray:
            with batcher.incoming():  # "tokenising"
                await asyncio.sleep(0.05)
            return await batcher.submit([[2, 2]])

        late_task = asyncio.create_task(late())
        await asyncio.sleep(0.01)
        await asyncio.gather(batcher.submit([[1, 1]]), late_task)

    asyncio.run(with_batcher(model, policy, expected))
    assert [len(p) for p in model.passes] == [2]  # waited for the second, one pass


def test_a_full_pass_does_not_wait() -> None:
    model = FakeModel()
    policy = BatchPolicy(max_batch_tokens=64, batch_timeout_ms=2000)

    async def body(batcher: Batcher) -> float:
        started = time.monotonic()
        with batcher.incoming():  # someone is on the way, but the queue is full already
            await batcher.submit([[1] * 32, [2] * 32])
        return time.monotonic() - started

    assert asyncio.run(with_batcher(model, policy, body)) < 0.5


def test_a_failing_pass_fails_only_its_requests() -> None:
    model = FakeModel(fail_on=666)

    async def body(batcher: Batcher) -> list[object]:
        bad = batcher.submit([[666] * 50])
        good = batcher.submit([[7, 7]])
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(with_batcher(model, BatchPolicy(), body))
    assert isinstance(bad, RuntimeError)
    assert isinstance(good, np.ndarray) and good.tolist() == [[2, 7]]


def test_batch_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchPolicy(max_batch_tokens=0)
    with pytest.raises(ValueError, match="batch_timeout_ms"):
        BatchPolicy(batch_timeout_ms=-1)


# --- request parsing -------------------------------------------------------------------------


def test_parse_accepts_every_openai_input_form() -> None:
    assert parse_request({"model": "m", "input": "a"}).texts == ("a",)
    assert parse_request({"model": "m", "input": ["a", "b"]}).texts == ("a", "b")
    flat = parse_request({"model": "m", "input": [1, 2]}).token_ids
    assert [ids.tolist() for ids in flat] == [[1, 2]]
    nested = parse_request({"model": "m", "input": [[1], [2, 3]]}).token_ids
    assert [ids.tolist() for ids in nested] == [[1], [2, 3]]
    assert all(ids.dtype == np.int32 for ids in nested)
    parsed = parse_request(
        {
            "model": "m",
            "input": "a",
            "encoding_format": "base64",
            "dimensions": 64,
            "user": "u",
            "input_type": "query",
        }
    )
    assert (parsed.encoding_format, parsed.dimensions, parsed.input_type) == ("base64", 64, "query")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "m", "input": ["a"] * (MAX_INPUTS + 1)}, f"maximum {MAX_INPUTS}"),
        ({"model": "m", "input": [True, False]}, "token arrays"),
        ({"model": "m", "input": "a", "dimensions": True}, "positive integer"),
        ({"model": "m", "input": [[1], "a"]}, "all be strings or all be token arrays"),
        ({"model": "", "input": "a"}, "'model' is required"),
    ],
)
def test_parse_refusals_name_the_problem(body: object, needle: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request(body)
    assert caught.value.kind.status == 400
    assert needle in caught.value.message


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_render_prometheus_text() -> None:
    metrics = ServerMetrics(queue_depth=lambda: 3, in_flight=lambda: 1)
    metrics.requests.inc(code="200")
    metrics.requests.inc(code="200")
    metrics.errors.inc(type="invalid_request")
    metrics.latency.observe(0.02)
    metrics.latency.observe(3.0)
    text = metrics.render({"model": 'we"ird\\name'})
    lines = text.splitlines()
    assert 'mlx_embeddings_requests_total{code="200"} 2' in lines
    assert 'mlx_embeddings_errors_total{type="invalid_request"} 1' in lines
    assert "mlx_embeddings_texts_total 0" in lines  # counters exist before first use
    assert 'mlx_embeddings_request_duration_seconds_bucket{le="0.025"} 1' in lines
    assert 'mlx_embeddings_request_duration_seconds_bucket{le="5"} 2' in lines
    assert 'mlx_embeddings_request_duration_seconds_bucket{le="+Inf"} 2' in lines
    assert "mlx_embeddings_request_duration_seconds_count 2" in lines
    assert "mlx_embeddings_queue_depth 3" in lines
    assert 'mlx_embeddings_model_info{model="we\\"ird\\\\name"} 1' in lines
    assert text.endswith("\n")
    for line in lines:  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# --- settings for a model folder -------------------------------------------------------------


def test_nomic_folder_settings_from_gpt2_style_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "nomic_bert", "n_embd": 768, "n_positions": 8192})
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "search_query: ", "document": "search_document: "}})
    )
    settings = resolve(tmp_path)
    assert settings.dimension == 768 and settings.max_seq_len == 8192
    assert settings.architecture.native and settings.pooling == "mean"
    assert (settings.query_prefix, settings.document_prefix) == (
        "search_query: ",
        "search_document: ",
    )


def test_unsupported_folder_is_refused_naming_the_choices(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelFolderError, match="nomic_bert"):
        resolve(tmp_path)


# --- finishing vectors -----------------------------------------------------------------------


def test_finish_truncates_then_normalises() -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    full = finish(vectors, None, normalize=True)
    np.testing.assert_allclose(full[0], [3 / 13, 4 / 13, 12 / 13], rtol=1e-6)
    assert np.all(np.isfinite(full[1]))  # a zero vector stays finite
    cut = finish(vectors, 2, normalize=True)
    np.testing.assert_allclose(cut[0], [0.6, 0.8], rtol=1e-6)
    raw = finish(vectors, 2, normalize=False)
    np.testing.assert_allclose(raw[0], [3.0, 4.0])
    assert cut.dtype == np.float32 and cut.flags.c_contiguous


def test_kernel_source_ships_with_the_package_and_keys_the_build() -> None:
    code = kernels.read_source()
    for symbol in ("softmax", "bias_add", "bias_gelu", "add_layernorm", "attention", "swiglu"):
        assert f"void mlxs_{symbol}(" in code  # each one Kernels binds
    name = kernels.library_name(code, "g++")
    assert name == kernels.library_name(code, "g++")
    assert name != kernels.library_name(code + "// edited\n", "g++")
    assert name != kernels.library_name(code, "clang++")


# --- which cached kernels may be loaded ------------------------------------------------------

STRANGER = 54321  # a uid that no account has (the tests run as root: modes are set, not denied)


def cached_library(folder: Path, body: bytes = b"\x7fELF built here") -> Path:
    """A cached library as a build publishes it: the file, then its recorded checksum."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    lib = folder / kernels.library_name(kernels.read_source(), "g++")
    lib.write_bytes(body)
    lib.chmod(0o700)
    (folder / (lib.name + ".sha256")).write_text(kernels._digest(lib) + "\n")
    return lib


def why_not(lib: Path) -> str | None:
    return kernels._why_not_load(lib, os.lstat(lib))


def test_a_cached_library_of_our_own_with_its_checksum_may_be_loaded(tmp_path: Path) -> None:
    assert why_not(cached_library(tmp_path)) is None


@needs_root
def test_a_library_planted_by_another_user_is_not_loaded(tmp_path: Path) -> None:
    lib = cached_library(tmp_path)
    os.chown(lib, STRANGER, -1)
    assert f"belongs to uid {STRANGER}" in why_not(lib)


@needs_root
def test_a_group_writable_library_is_not_loaded(tmp_path: Path) -> None:
    lib = cached_library(tmp_path)
    os.chown(lib, -1, STRANGER)
    lib.chmod(0o770)
    assert "can write it (mode 0770)" in why_not(lib)


def test_a_truncated_library_is_not_loaded(tmp_path: Path) -> None:
    """dlopen maps a truncated ELF without complaint, then the process dies of SIGBUS."""
    lib = cached_library(tmp_path)
    lib.write_bytes(lib.read_bytes()[:5])
    assert "differ from the checksum" in why_not(lib)


def test_a_library_without_a_checksum_or_behind_a_link_is_not_loaded(tmp_path: Path) -> None:
    lib = cached_library(tmp_path)
    Path(str(lib) + ".sha256").unlink()
    assert "no readable checksum" in why_not(lib)
    real = cached_library(tmp_path / "elsewhere")
    lib.unlink()
    lib.symlink_to(real)
    assert why_not(lib) == "it is not a regular file"


@needs_root
def test_the_kernel_cache_is_private_and_never_shared(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, why = kernels._cache_dir()
    assert folder == tmp_path / "cache" / "mlx-stack" / "kernels" and why == ""
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    folder.chmod(0o755)  # as older versions made it: ours, only readable: made private
    assert kernels._cache_dir()[0] == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chown(folder, STRANGER, -1)  # someone else's: not used, and no /tmp fallback either
    folder2, why = kernels._cache_dir()
    assert folder2 is None and f"belongs to uid {STRANGER}" in why
    os.chown(folder, os.geteuid(), -1)
    (tmp_path / "cache").chmod(0o777)  # a parent anyone can write: the folder could be swapped
    folder3, why = kernels._cache_dir()
    assert folder3 is None and "every user can write" in why
