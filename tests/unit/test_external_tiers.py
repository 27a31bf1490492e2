"""External servers as tiers (``config/external.py``): the stack file's forms and their errors,
the services they plan, the proxy deployments they become, and the supervisor's deadline for
them. Pure: no process, no network (a command's program is looked up on PATH, nothing more)."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from fakeruntime import Scenario, spec

from mlx_stack.backendkey import LITELLM_API_KEY
from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.plan import ProbeKind, ServiceKind, build_plan
from mlx_stack.config.proxykey import ensure_key
from mlx_stack.config.stackfile import parse_stack_text
from mlx_stack.errors import ConfigError
from mlx_stack.litellm.config import build_config, render_config, routes
from mlx_stack.litellm.fastlane import upstreams_from_config
from mlx_stack.litellm.normalize import models_from_config
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor.states import ServiceState

CATALOG = load_catalog(None)
PY = sys.executable


def parse(text: str):
    return parse_stack_text(text, Path("stack.yaml"), CATALOG, "Linux")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_a_command_tier_as_a_list_or_a_shell_string():
    listed = parse(f"tiers:\n  big:\n    command: [{PY}, -m, server, --port, '9001']\n"
                   "    port: 9001\n")
    shelled = parse(f"tiers:\n  big:\n    command: \"{PY} -m server --port '9001'\"\n"
                    "    port: 9001\n")
    assert listed.external == shelled.external
    t = listed.external[0]
    assert t.command == (PY, "-m", "server", "--port", "9001") and t.supervised
    assert (t.kind, t.backend, t.served_model, t.port) == ("chat", "openai", "big", 9001)
    assert t.url == "http://127.0.0.1:9001" and t.health == "/v1/models"
    assert listed.tiers == () and listed.chat_names == ("big",)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080", "http://10.0.0.5:8080/",
                                 "http://10.0.0.5:8080/v1", "http://10.0.0.5:8080/v1/"])
def test_a_url_tier_takes_the_base_url_with_or_without_v1(url):
    t = parse(f"tiers:\n  remote:\n    url: {url}\n    served_model: qwen\n").external[0]
    assert t.url == "http://10.0.0.5:8080" and t.api_base == "http://10.0.0.5:8080/v1"
    assert not t.supervised and t.port is None and t.served_model == "qwen"


def test_ollama_embeddings_defaults():
    by_url = parse("embeddings:\n  backend: ollama\n  model: nomic-embed-text\n")
    t = by_url.external_embeddings
    assert t is not None and by_url.embeddings is None
    assert (t.name, t.kind, t.served_model) == ("embeddings", "embeddings", "nomic-embed-text")
    assert t.url == "http://127.0.0.1:11434" and t.health == "/api/version"
    assert not t.supervised
    run = parse("embeddings:\n  backend: ollama\n  model: nomic-embed-text\n"
                "  command: ollama serve\n  port: 11500\n").external_embeddings
    assert run is not None and run.command == ("ollama", "serve")
    assert run.env == {"OLLAMA_HOST": "127.0.0.1:11500"} and run.url == "http://127.0.0.1:11500"
    default_port = parse("embeddings:\n  backend: ollama\n  model: m\n  command: [ollama, serve]\n"
                         ).external_embeddings
    assert default_port is not None and default_port.port == 11434


@pytest.mark.parametrize(("body", "line", "expected"), [
    ("  model: tiny\n  command: [x]\n  port: 9001\n", 3,
     "give exactly one of model: (a catalog model the stack serves), command: (a program the "
     "stack runs) or url: (a server it only probes); found model and command"),
    ("  url: http://h:1\n  command: [x]\n  port: 9001\n", 3, "found command and url"),
    ("  command: [x]\n", 3, "missing required key 'port'"),
    ("  command: []\n  port: 9001\n", 4, "must be a program and its arguments"),
    ("  command: \"x 'unclosed\"\n  port: 9001\n", 4, "cannot split"),
    ("  url: ftp://h/x\n", 4, "is not an http(s) URL with a host"),
    ("  url: http://user:pw@h:1\n", 4, "no query, fragment or user:password"),
    ("  url: http://h:1\n  port: 9001\n", 5, "port: is for command: servers"),
    ("  url: http://h:1\n  env: {A: b}\n", 5, "env: is for command: servers"),
    ("  command: [x]\n  port: 9001\n  backend: mlx-lm\n", 6,
     "backend 'mlx-lm' runs a catalog model"),
    ("  command: [x]\n  port: 9001\n  quant: 4bit\n", 6, "quant: is for catalog models"),
    ("  command: [x]\n  port: 9001\n  env: {'1A': b}\n", 6, "is not an environment variable"),
    ("  command: [x]\n  port: 9001\n  health: v1/models\n", 6, "is not a path"),
    ("  command: [x]\n  port: 9001\n  ready_timeout_s: 0\n", 6, "must be > 0"),
    ("  command: [x]\n  port: 80\n", 5, "out of range"),
    ("  command: [x]\n  port: 9001\n  served: m\n", 6, "unknown key 'served'"),
    ("  backend: openai\n", 3, "an external server (backend: openai) needs command:"),
    ("  backend: openai\n  model: qwen\n", 3, "the name it serves is served_model:"),
])
def test_bad_external_tiers_are_refused_with_the_line(body, line, expected):
    text = "version: 1\ntiers:\n  big:\n" + "\n".join("  " + x for x in body.splitlines()) + "\n"
    found = problems(text)
    assert any(expected in p for p in found), found
    assert any(p.startswith(f"stack.yaml:{line}:") for p in found), found


def test_ollama_needs_a_model_and_not_both_forms():
    assert any("backend: ollama needs model:" in p
               for p in problems("embeddings:\n  backend: ollama\n"))
    assert any("not both" in p for p in problems(
        "embeddings:\n  backend: ollama\n  model: m\n  url: http://h:1\n  command: [x]\n"))
    assert any("drop served_model" in p for p in problems(
        "embeddings:\n  backend: ollama\n  model: m\n  served_model: n\n"))


def test_an_external_port_clashes_like_any_other():
    found = problems("tiers:\n  a:\n    command: [x]\n    port: 9001\n"
                     "embeddings:\n  command: [y]\n  port: 9001\n")
    assert any("port 9001 is used by both 'a' and 'embeddings'" in p for p in found), found


def test_the_mlx_embed_backend_is_not_an_external_server():
    found = problems("embeddings:\n  backend: mlx-embed\n  url: http://h:1\n")
    assert any("backend 'mlx-embed' runs a catalog model" in p for p in found), found


# ----- the plan ------------------------------------------------------------------------------


def _stack_and_paths(tmp_path: Path, text: str):
    paths = StatePaths(tmp_path)
    ensure_key(paths.key_file())
    return parse(text), paths


def test_a_command_tier_is_a_supervised_service_with_its_own_probe(tmp_path):
    (tmp_path / "big.key").write_text("sk-big-secret\n")
    stack, paths = _stack_and_paths(tmp_path, (
        f"tiers:\n  big:\n    command: [{PY}, -m, srv]\n    port: 9001\n"
        "    served_model: qwen\n    health: /healthz\n    ready_timeout_s: 90\n"
        "    env: {THREADS: 4}\n    key_file: big.key\n"))
    plan = build_plan(stack, paths, backend_key="bk-backend")
    s = next(s for s in plan.model_servers if s.name == "big")
    assert s.kind is ServiceKind.CHAT and s.argv == (PY, "-m", "srv") and s.port == 9001
    assert s.env == {"THREADS": "4"} and s.ready_timeout_s == 90.0 and s.model == "qwen"
    assert s.probe.kind is ProbeKind.CHAT and s.probe.url == "http://127.0.0.1:9001"
    assert (s.probe.model, s.probe.health, s.probe.key) == ("qwen", "/healthz", "sk-big-secret")
    # the stack's own secret stays with the stack's own servers
    assert "bk-backend" not in s.full_env().values() and not s.session_env
    assert "sk-big-secret" not in repr(s) and plan.endpoints == ()
    assert plan.proxy.secret_env["MLX_STACK_TIER_KEY_BIG"] == "sk-big-secret"
    config = plan.proxy.config_file[1] if plan.proxy.config_file else ""
    assert "sk-big-secret" not in config and "os.environ/MLX_STACK_TIER_KEY_BIG" in config


def test_a_url_tier_is_an_endpoint_not_a_process(tmp_path):
    stack, paths = _stack_and_paths(tmp_path, "tiers:\n  remote:\n    url: http://10.0.0.5:8080\n")
    plan = build_plan(stack, paths)
    assert [s.name for s in plan.all] == ["proxy"] and plan.missing == {}
    (e,) = plan.endpoints
    assert e.name == "remote" and e.kind is ServiceKind.CHAT
    assert e.probe.url == "http://10.0.0.5:8080" and e.probe.key is None


def test_a_command_whose_program_is_not_installed_is_missing(tmp_path):
    stack, paths = _stack_and_paths(tmp_path, (
        "embeddings:\n  backend: ollama\n  model: m\n  command: [no-such-ollama-here, serve]\n"))
    plan = build_plan(stack, paths)
    assert "program 'no-such-ollama-here' is not installed here" in plan.missing["embeddings"]
    assert "embeddings.command" in plan.missing["embeddings"]


def test_an_unreadable_key_file_names_the_field(tmp_path):
    stack, paths = _stack_and_paths(tmp_path, (
        "tiers:\n  remote:\n    url: http://h:1\n    key_file: nowhere.key\n"))
    with pytest.raises(ConfigError, match=r"tiers\.remote\.key_file: cannot read .*nowhere"):
        build_plan(stack, paths)


# ----- the proxy's config --------------------------------------------------------------------


def test_external_tiers_become_deployments_with_fallbacks(tmp_path):
    stack = parse(
        "tiers:\n  big:\n    command: [x]\n    port: 9001\n"
        "  remote:\n    url: https://gpu.lan:8443/v1\n    served_model: qwen\n"
        "    key_file: remote.key\n"
        "embeddings:\n  backend: ollama\n  model: nomic-embed-text\n")
    config = build_config(stack, {})
    by_name = {d["model_name"]: d for d in config["model_list"]}
    assert by_name["big"]["litellm_params"] == {
        "model": "openai/big", "api_base": "http://127.0.0.1:9001/v1", "api_key": "no-key",
        "timeout": 600.0, "stream_timeout": 600.0}
    assert by_name["remote"]["litellm_params"]["api_base"] == "https://gpu.lan:8443/v1"
    assert by_name["remote"]["litellm_params"]["api_key"] == \
        "os.environ/MLX_STACK_TIER_KEY_REMOTE"
    emb = by_name["local-embed"]
    assert emb["litellm_params"]["model"] == "openai/nomic-embed-text"
    assert emb["litellm_params"]["api_base"] == "http://127.0.0.1:11434/v1"
    assert emb["model_info"] == {"mode": "embedding"}
    assert LITELLM_API_KEY not in render_config(config)  # no backend key for a foreign server
    assert config["router_settings"]["fallbacks"] == [{"big": ["remote"]}, {"remote": ["big"]}]
    r = routes(stack)
    assert r["local-embed"].service == "embeddings" and r["big"].fallbacks == ("remote",)


def test_external_embeddings_skip_the_fast_lane_and_take_the_normaliser(tmp_path):
    """The fast lane forwards verbatim with the backend key: only for the stack's own server.
    An Ollama on loopback goes through normalize.py (and LiteLLM) instead."""
    stack = parse("embeddings:\n  backend: ollama\n  model: nomic-embed-text\n")
    path = tmp_path / "litellm.yaml"
    path.write_text(render_config(build_config(stack, {})))
    assert upstreams_from_config(path) == {}
    assert upstreams_from_config(path, routes(stack)) == {}  # as the proxy reads it
    assert models_from_config(path) == {"local-embed"}
    own = parse("embeddings:\n  model: all-minilm-l6-v2\n  port: 8003\n")
    path.write_text(yaml.safe_dump(build_config(own, {})))
    assert set(upstreams_from_config(path)) == {"local-embed"}
    assert set(upstreams_from_config(path, routes(own))) == {"local-embed"}
    assert models_from_config(path) == frozenset()
    # A deployment with a key of its own that is not an external tier's (another stack's
    # proxy, say) is none of this layer's business.
    other = {"model_list": [{"model_name": "local-embed", "model_info": {"mode": "embedding"},
                             "litellm_params": {"api_base": "http://127.0.0.2:4000/v1",
                                                "api_key": "os.environ/OTHER_KEY"}}]}
    path.write_text(yaml.safe_dump(other))
    assert models_from_config(path) == frozenset() and upstreams_from_config(path) == {}


# ----- the supervisor ------------------------------------------------------------------------


def test_ready_timeout_s_replaces_the_progress_deadline(tmp_path):
    """An external server's log is no sign of loading progress the supervisor can read: its
    ``ready_timeout_s`` is a fixed deadline, even while its log grows."""
    ext = replace(spec("big"), ready_timeout_s=4.0)
    sc = Scenario(tmp_path, ext)
    sc.rt.health["big"] = "fail"
    sc.until(lambda: sc.rt.child("big") is not None)
    child = sc.rt.child("big")
    for _ in range(60):  # 6 fake seconds, the log growing all along
        sc.rt.log("big").write_line(b"still loading")
        sc.tick()
    assert not child.alive and child.signals == [signal.SIGKILL]
    assert "not ready after 4 s" in sc.rt.log("big").text


def test_a_stack_of_url_tiers_only_still_starts_its_proxy(tmp_path):
    sc = Scenario(tmp_path)  # no model server: every tier is a url: tier
    sc.until(lambda: sc.state("proxy") is ServiceState.READY, what="proxy ready")


def _uncommented(text: str, first: str, last: str) -> str:
    """The commented-out example from its line ``first`` up to the line before ``last``."""
    lines = text.splitlines()
    start = lines.index(first)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
    return "\n".join(line.replace("# ", "", 1) for line in lines[start:end]) + "\n"


def test_the_commented_examples_of_stack_example_yaml_are_valid():
    text = (Path(__file__).resolve().parents[2] / "stack.example.yaml").read_text()
    tiers = parse("tiers:\n" + _uncommented(text, "  # big:", "# The embeddings tier"))
    assert [t.name for t in tiers.external] == ["big", "gpu-box"]
    assert tiers.external[0].ready_timeout_s == 300 and tiers.external[1].key_file
    emb = parse(_uncommented(text, "# embeddings:", "# The rerank tier"))
    assert emb.external_embeddings is not None
    assert emb.external_embeddings.command == ("ollama", "serve")


def test_external_tiers_survive_a_rewrite_of_the_stack_file():
    """`init --add-embeddings --force` rewrites the file from its parsed form."""
    from mlx_stack.config.stackfile import render_stack

    stack = parse(
        "tiers:\n  big:\n    command: [srv, --port, 9001]\n    port: 9001\n"
        "    served_model: 'q: 32b'\n    health: /h\n    ready_timeout_s: 90\n"
        "    env: {A: '1'}\n    key_file: big.key\n"
        "  remote:\n    url: https://h:8443/v1\n"
        "embeddings:\n  backend: ollama\n  model: nomic-embed-text\n  command: [ollama, serve]\n"
        "  port: 11500\n")
    again = parse(render_stack(stack))
    assert again.external == stack.external and again.chat_names == ("big", "remote")


def test_numbers_in_a_command_list_are_its_text():
    t = parse("tiers:\n  big:\n    command: [srv, --port, 9001, --temp, 0.5]\n    port: 9001\n")
    assert t.external[0].command == ("srv", "--port", "9001", "--temp", "0.5")


@pytest.mark.parametrize(("body", "expected"), [
    ("    url: http://h:1\n    key_file: ~nosuchuser-here/k\n", "no such user's home folder"),
    ("    url: http://h:1\n    served_model: ''\n", "is not a model name"),
    ("    url: 'http://[::1'\n", "is not a URL"),
    ("    command: [srv, true]\n    port: 9001\n", "must be a program and its arguments"),
])
def test_more_bad_external_values(body, expected):
    found = problems("tiers:\n  big:\n" + body)
    assert any(expected in p for p in found), found


def test_add_embeddings_refuses_a_stack_whose_embeddings_are_external(tmp_path):
    from mlx_stack.config.hardware import Hardware
    from mlx_stack.config.stackinit import add_embeddings

    paths = StatePaths(tmp_path)
    paths.stack_file.write_text("embeddings:\n  backend: ollama\n  model: nomic-embed-text\n")
    hw = Hardware(system="Linux", machine="x86_64", chip="cpu", cores=2, memory_gb=16,
                  backend="cpu")
    with pytest.raises(ConfigError, match=r"already has an embeddings tier \(ollama: "
                       r"nomic-embed-text\)"):
        add_embeddings(paths, CATALOG, hw, "all-minilm-l6-v2", force=False)


EXTERNAL_STACK = {
    "tiers": {
        "big": {"command": ["srv", "--port", "9001"], "port": 9001, "served_model": "q",
                "health": "/health", "ready_timeout_s": 90, "env": {"A": "1"},
                "key_file": "big.key"},
        "remote": {"url": "http://10.0.0.5:8080/v1", "key_file": "remote.key"},
    },
    "embeddings": {"backend": "ollama", "model": "nomic-embed-text",
                   "command": ["ollama", "serve"], "port": 11500},
}


@pytest.fixture(scope="module")
def prop_home(tmp_path_factory: pytest.TempPathFactory) -> StatePaths:
    paths = StatePaths(tmp_path_factory.mktemp("home"))
    paths.user_catalog.mkdir()
    ensure_key(paths.key_file())
    (paths.home / "big.key").write_text("sk-big\n")
    return paths


def test_mutated_external_tiers_load_or_name_file_and_line(prop_home):
    """The property tests' mutations (tests/unit/test_config_properties.py) of a stack of
    external tiers: each loads and plans, or is refused with file:line; never a traceback."""
    from hypothesis import given
    from test_config_properties import check_stack, examples, mutated

    assert check_stack(prop_home, yaml.safe_dump(EXTERNAL_STACK).encode()) is not None

    @examples(80)
    @given(text=mutated(EXTERNAL_STACK))
    def run(text: str) -> None:
        check_stack(prop_home, text.encode("utf-8"))

    run()


def test_a_new_served_model_health_or_deadline_is_a_new_definition(tmp_path):
    """The supervisor applies an edit by fingerprint: what is not in an external server's
    command line must be in its fingerprint, or the old probe would go on."""
    base = f"tiers:\n  big:\n    command: [{PY}]\n    port: 9001\n"
    paths = StatePaths(tmp_path)
    ensure_key(paths.key_file())

    def fingerprint(extra: str) -> str:
        return build_plan(parse(base + extra), paths).model_servers[0].fingerprint

    first = fingerprint("")
    assert first == fingerprint("")
    changed = [fingerprint("    served_model: other\n"), fingerprint("    health: /h\n"),
               fingerprint("    ready_timeout_s: 5\n")]
    assert first not in changed and len(set(changed)) == 3


def test_a_command_tier_without_ready_timeout_s_gets_a_fixed_start_timeout_s(tmp_path):
    """Not the progress-based deadline: a server that logs each failing probe (an Ollama
    model not pulled) would look like it is loading for start_timeout_max_s (30 min)."""
    stack, paths = _stack_and_paths(tmp_path, (
        f"tiers:\n  big:\n    command: [{PY}]\n    port: 9001\n"
        "watchdog:\n  start_timeout_s: 45\n"))
    assert build_plan(stack, paths).model_servers[0].ready_timeout_s == 45.0
