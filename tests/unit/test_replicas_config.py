"""``replicas: N`` on the embeddings and rerank sections: parsing and validation (with the
line), the plan's N services on consecutive ports, LiteLLM's N deployments under one name,
the gate's route, and what a command name means (``embeddings``, ``embeddings-1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.plan import build_plan
from mlx_stack.config.stackfile import parse_stack_text, render_stack
from mlx_stack.contract.addressing import resolve
from mlx_stack.errors import ConfigError
from mlx_stack.litellm.config import build_config, routes
from mlx_stack.litellm.gate import Route, decide, routes_from_env, routes_to_env
from mlx_stack.paths import StatePaths

CATALOG = load_catalog()
KEY = "sk-test-proxy-key-0123456789"
EMB = "embeddings:\n  model: all-minilm-l6-v2\n  port: 8003\n  replicas: {n}\n"


def stack_of(text: str):
    return parse_stack_text(text, Path("stack.yaml"), CATALOG, "Linux")


def problems_of(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        stack_of(text)
    return str(err.value)


def test_replicas_default_to_one_and_name_consecutive_ports():
    one = stack_of(EMB.replace("  replicas: {n}\n", ""))
    assert one.embeddings.replicas == 1 and one.embeddings.replica_names == ("embeddings",)
    three = stack_of(EMB.format(n=3))
    assert three.embeddings.replica_names == ("embeddings", "embeddings-2", "embeddings-3")
    assert three.embeddings.ports == (8003, 8004, 8005)
    rr = stack_of("rerank:\n  model: ms-marco-minilm-l6-v2\n  port: 8010\n  replicas: 2\n")
    assert rr.rerank.replica_names == ("rerank", "rerank-2") and rr.rerank.ports == (8010, 8011)


@pytest.mark.parametrize(("text", "expected"), [
    (EMB.format(n=0), "stack.yaml:4: embeddings.replicas: must be between 1 and 16, got 0"),
    (EMB.format(n=17), "embeddings.replicas: must be between 1 and 16, got 17"),
    (EMB.format(n='"two"'), "stack.yaml:4: embeddings.replicas: expected integer"),
    (EMB.format(n=True), "embeddings.replicas"),
    (EMB.format(n=3).replace("8003", "65534"),
     "embeddings.replicas: 3 replicas from port 65534 need ports up to 65536, beyond 65535"),
    # The second replica's port is the rerank tier's: the overlap is named, with its line.
    (EMB.format(n=2) + "rerank:\n  model: ms-marco-minilm-l6-v2\n  port: 8004\n",
     "stack.yaml:7: rerank.port: port 8004 is used by both 'embeddings-2' and 'rerank' "
     "(replicas take consecutive ports from their section's port)"),
    (EMB.format(n=2) + "proxy:\n  port: 8004\n",
     "proxy.port: port 8004 is used by both 'embeddings-2' and 'proxy'"),
    ("tiers:\n  chat:\n    model: qwen3-1.7b\n    port: 8005\n" + EMB.format(n=3),
     "stack.yaml:8: embeddings.replicas: port 8005 is used by both 'chat' and 'embeddings-3'"),
    ("tiers:\n  embeddings-2:\n    model: qwen3-1.7b\n    port: 8100\n",
     "tiers.embeddings-2: 'embeddings-2' is reserved"),
    ("rerank:\n  model: ms-marco-minilm-l6-v2\n  replicas: -1\n",
     "rerank.replicas: must be between 1 and 16, got -1"),
])
def test_bad_replicas_are_refused_with_the_line(text, expected):
    assert expected in problems_of(text)


def test_render_keeps_replicas():
    stack = stack_of(EMB.format(n=4))
    again = stack_of(render_stack(stack))
    assert again.embeddings == stack.embeddings
    assert "replicas" not in render_stack(stack_of(EMB.format(n=1)))


def test_plan_expands_the_tier_into_one_service_per_replica(tmp_path):
    plan = build_plan(stack_of(EMB.format(n=3)), StatePaths(tmp_path), key=KEY)
    specs = plan.model_servers
    assert [(s.name, s.port, s.group) for s in specs] == [
        ("embeddings", 8003, "embeddings"), ("embeddings-2", 8004, "embeddings"),
        ("embeddings-3", 8005, "embeddings")]
    for s in specs:
        assert s.argv[s.argv.index("--port") + 1] == str(s.port)
        assert s.probe.url == f"http://127.0.0.1:{s.port}"
    assert len({s.fingerprint for s in specs}) == 3
    # The first replica is the very service a stack without replicas runs: no restart on
    # upgrade, and `embeddings` keeps its logs.
    single = build_plan(stack_of(EMB.format(n=1)), StatePaths(tmp_path), key=KEY)
    assert single.model_servers[0].fingerprint == specs[0].fingerprint
    assert plan.groups == {"embeddings": ("embeddings", "embeddings-2", "embeddings-3")}
    assert plan.aliases == {"embeddings-1": "embeddings"}
    assert "embeddings-1" in plan.names and "embeddings-3" in plan.names
    assert single.groups == {} and single.aliases == {}


def test_litellm_gets_one_deployment_per_replica_under_one_name(tmp_path):
    stack = stack_of(EMB.format(n=2)
                     + "rerank:\n  model: ms-marco-minilm-l6-v2\n  port: 8010\n  replicas: 2\n")
    config = build_config(stack, {})
    bases = [(m["model_name"], m["litellm_params"]["api_base"], m["litellm_params"]["model"])
             for m in config["model_list"]]
    assert bases == [
        ("local-embed", "http://127.0.0.1:8003/v1", "openai/local-embed"),
        ("local-embed", "http://127.0.0.1:8004/v1", "openai/local-embed"),
        ("local-rerank", "http://127.0.0.1:8010", "cohere/local-rerank"),
        ("local-rerank", "http://127.0.0.1:8011", "cohere/local-rerank")]
    # A model change leaves the proxy's config as it is: the proxy is not restarted.
    other = stack_of(EMB.format(n=2).replace("all-minilm-l6-v2", "bge-small-en-v1.5")
                     + "rerank:\n  model: ms-marco-minilm-l6-v2\n  port: 8010\n  replicas: 2\n")
    assert build_config(other, {}) == config


def test_the_route_names_every_replica_and_survives_the_environment():
    table = routes(stack_of(EMB.format(n=2)))
    assert table["local-embed"] == Route(
        "embeddings", replicas=(("embeddings", 8003), ("embeddings-2", 8004)))
    assert routes_from_env({"MLX_STACK_ROUTES": routes_to_env(table)}) == table


@pytest.mark.parametrize(("states", "available"), [
    ({"embeddings": "ready", "embeddings-2": "ready"}, True),
    ({"embeddings": "stopping", "embeddings-2": "ready"}, True),  # one replaced: still served
    ({"embeddings": "ready", "embeddings-2": "draining"}, True),
    ({"embeddings": "backoff", "embeddings-2": "draining"}, False),  # hold, then 503
    ({"embeddings": "backoff", "embeddings-2": "starting"}, False),
])
def test_the_gate_holds_only_when_no_replica_is_ready(states, available):
    table = routes(stack_of(EMB.format(n=2)))
    decision = decide("local-embed", table, states)
    assert (decision.refuse == "") is available
    if not available:
        assert "embeddings is backoff" in decision.refuse and "embeddings-2 is" in decision.refuse


def test_a_command_name_addresses_the_tier_one_replica_or_itself():
    groups = {"embeddings": ("embeddings", "embeddings-2")}
    assert resolve("embeddings", groups) == ("embeddings", "embeddings-2")
    assert resolve("embeddings-1", groups) == ("embeddings",)
    assert resolve("embeddings-2", groups) == ("embeddings-2",)
    assert resolve("standard", groups) == ("standard",)
    assert resolve("embeddings", {}) == ("embeddings",)


def test_status_shows_each_replica_with_its_tier_and_a_drained_one_says_so(tmp_path,
                                                                           monkeypatch):
    from mlx_stack.cli import lifecycle, render
    from mlx_stack.contract.snapshot import (
        ServiceSnapshot,
        SupervisorSnapshot,
        load_snapshot,
        snapshot_text,
    )

    paths = StatePaths(tmp_path)
    paths.state_file.parent.mkdir(parents=True)
    plan = build_plan(stack_of(EMB.format(n=2)), paths, key=KEY)
    specs = {s.name: s for s in plan.all}
    snap = SupervisorSnapshot(pid=1, create_time=1.0, argv=("x",), started_at=1.0, services=(
        ServiceSnapshot(name="embeddings", kind="embeddings", state="ready", port=8003,
                        fingerprint=specs["embeddings"].fingerprint, group="embeddings",
                        in_route=False),
        ServiceSnapshot(name="embeddings-2", kind="embeddings", state="ready", port=8004,
                        fingerprint=specs["embeddings-2"].fingerprint, group="embeddings"),
        ServiceSnapshot(name="proxy", kind="proxy", state="ready", port=4000,
                        fingerprint=plan.proxy.fingerprint)))
    paths.state_file.write_text(snapshot_text(snap))
    assert load_snapshot(paths.state_file) == snap  # the contract carries group and in_route
    monkeypatch.setattr(lifecycle, "supervisor_alive", lambda s: s is not None)
    rows = {r.name: r for r in lifecycle.status(paths, plan)}
    assert rows["embeddings"].to_json()["tier"] == "embeddings"
    assert rows["embeddings"].to_json()["in_route"] is False
    assert rows["embeddings"].detail.startswith("out of the route: finishing its requests")
    assert rows["embeddings-2"].detail == "" and rows["embeddings-2"].port == 8004
    assert rows["proxy"].to_json()["tier"] is None
    con = render.Console(width=240, record=True)
    con.print(render.status_table(list(rows.values())))
    text = con.export_text()
    assert "embeddings-2" in text and "out of the route" in text
    assert lifecycle.addressed(paths, plan, "embeddings") == ("embeddings", "embeddings-2")
    assert lifecycle.addressed(paths, plan, "embeddings-1") == ("embeddings",)

