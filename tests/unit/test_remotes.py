"""Remote stacks: the ``remotes:`` section, identity comparison and verdicts, the proxy config
they generate, the launcher's filter, and the supervisor's prober on fakes (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fakeruntime import Scenario, spec

from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.plan import Plan, RemoteTarget, ServiceKind, build_plan
from mlx_stack.config.remotes import (
    Remote,
    RemoteModel,
    Verdict,
    identity_differences,
    judge,
    merge_identities,
)
from mlx_stack.config.stackfile import parse_stack_text
from mlx_stack.contract.snapshot import SupervisorSnapshot, snapshot_text
from mlx_stack.errors import ConfigError, StateError
from mlx_stack.litellm import fastlane
from mlx_stack.litellm.config import build_config, render_config
from mlx_stack.litellm.remotes import effective_config, filter_config
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor.remotes import RemoteCheck, RemoteProber
from mlx_stack.supervisor.states import ServiceState

CATALOG = load_catalog()
BASE = """\
version: 1
tiers:
  standard:
    model: qwen3-8b
    port: 8000
embeddings:
  model: all-minilm-l6-v2
  port: 8003
proxy:
  port: 4000
"""
REMOTES = """\
remotes:
  studio:
    url: http://192.168.1.20:4000/
    key_file: remotes/studio.key
    models: [standard, local-embed, {name: fast, as: big}]
"""


def parse(text: str):
    return parse_stack_text(text, Path("stack.yaml"), CATALOG, "Linux")


def test_a_remote_section_parses_into_typed_records():
    s = parse(BASE + REMOTES)
    (r,) = s.remotes
    assert r.name == "studio" and r.url == "http://192.168.1.20:4000"
    assert r.key_file == "remotes/studio.key" and r.key_env == "MLX_STACK_REMOTE_KEY_0"
    assert [(m.name, m.joined, m.mode, m.needs_identity) for m in r.models] == [
        ("standard", "standard", "chat", False),
        ("local-embed", "local-embed", "embedding", True),
        ("fast", "big", "chat", False)]


@pytest.mark.parametrize(("edit", "expected"), [
    (("http://192.168.1.20:4000/", "ftp://h:1"), ["stack.yaml:13:", "use http://HOST:PORT"]),
    (("http://192.168.1.20:4000/", "http://h:4000/x"), ["the proxy's root"]),
    (("http://192.168.1.20:4000/", "http://u:p@h:4000"), ["no credentials in the URL"]),
    (("http://192.168.1.20:4000/", "http://h:99999"), ["is not a URL"]),
    (("key_file: remotes/studio.key", "key_file: ''"), ["stack.yaml:14:", "not a file name"]),
    (("key_file: remotes/studio.key", "kee_file: x"), ["unknown key 'kee_file'",
                                                      "did you mean 'key_file'"]),
    (("[standard, local-embed, {name: fast, as: big}]", "[]"), ["name at least one model"]),
    (("{name: fast, as: big}", "{name: fast, as: local-embed}"),
     ["chat model 'fast' cannot join as 'local-embed'"]),
    (("{name: fast, as: big}", "{name: local-rerank, as: local-embed}"),
     ["only the same kind of model"]),
    (("{name: fast, as: big}", "{name: local-embed, as: standard}"),
     ["cannot join the local chat model 'standard'"]),
    (("{name: fast, as: big}", "{name: fast, as: standard}"),
     ["'standard' is named twice for this remote"]),
    (("{name: fast, as: big}", "{name: fast, az: big}"), ["unknown key 'az'"]),
    (("{name: fast, as: big}", "'bad name'"), ["is not a model name"]),
    (("  studio:", "  Studio!:"), ["remote name"]),
])
def test_bad_remote_sections_are_refused_with_the_line(edit, expected):
    text = (BASE + REMOTES).replace(*edit)
    with pytest.raises(ConfigError) as exc:
        parse(text)
    message = str(exc.value)
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("url", ["http://127.0.0.1:4000", "http://localhost:4000",
                                 "https://127.0.0.1:4000"])
def test_a_remote_that_is_this_proxy_is_refused(url):
    with pytest.raises(ConfigError, match=r"stack.yaml:13: remotes.studio.url: .*own proxy"):
        parse((BASE + REMOTES).replace("http://192.168.1.20:4000/", url))
    parse((BASE + REMOTES).replace("http://192.168.1.20:4000/", "http://127.0.0.2:4000"))


def test_remotes_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"stack.yaml:11: remotes: expected mapping or null"):
        parse(BASE + "remotes: [a]\n")


IDENT = {"task": "embed", "content_sha256": "abc", "pooling": "mean", "normalize": True,
         "query_prefix": "", "document_prefix": "", "dimensions": 384,
         "matryoshka_dimensions": []}


def test_identity_differences_say_what_differs():
    assert identity_differences(IDENT, dict(IDENT)) == []
    other = {**IDENT, "content_sha256": "def", "query_prefix": "query: "}
    diffs = identity_differences(IDENT, other)
    assert diffs == ["content_sha256: local 'abc', remote 'def'",
                     "query_prefix: local '', remote 'query: '"]
    unknown = identity_differences(IDENT, {**IDENT, "content_sha256": None})
    assert any("unknown" in d for d in unknown)


def remote(name: str, *models: tuple[str, str], index: int = 0) -> Remote:
    return Remote(name, f"http://{name}:4000", f"{name}.key",
                  tuple(RemoteModel(n, j) for n, j in models), index)


EMBED = ("local-embed", "local-embed")


def test_judge_accepts_equal_identities_and_refuses_others_with_the_reason():
    a, b = remote("a", EMBED, ("standard", "standard")), remote("b", EMBED, index=1)
    seen = {"a": {"local-embed": IDENT}, "b": {"local-embed": {**IDENT, "pooling": "cls"}}}
    j = judge((a, b), {"local-embed": IDENT}, seen)
    assert j[("a", "local-embed")].verdict is Verdict.ACCEPTED
    assert j[("a", "standard")].verdict is Verdict.ACCEPTED
    refused = j[("b", "local-embed")]
    assert refused.verdict is Verdict.REFUSED
    assert "pooling: local 'mean', remote 'b' 'cls'" in refused.reason
    assert "corrupt stored vectors" in refused.reason


def test_judge_waits_for_unknown_identities_on_either_side():
    a = remote("a", EMBED)
    assert judge((a,), {"local-embed": IDENT}, {"a": None})[
        ("a", "local-embed")].verdict is Verdict.PENDING
    assert judge((a,), {"local-embed": None}, {"a": {"local-embed": IDENT}})[
        ("a", "local-embed")].verdict is Verdict.PENDING
    loading = {"a": {"local-embed": {**IDENT, "content_sha256": None}}}
    assert judge((a,), {"local-embed": IDENT}, loading)[
        ("a", "local-embed")].verdict is Verdict.PENDING
    absent = judge((a,), {"local-embed": IDENT}, {"a": {"standard": {"mode": "chat"}}})
    assert absent[("a", "local-embed")].verdict is Verdict.REFUSED
    assert "serves no 'local-embed'" in absent[("a", "local-embed")].reason


def test_without_a_local_tier_the_first_known_remote_is_the_reference():
    a, b = remote("a", EMBED), remote("b", EMBED, index=1)
    other = {**IDENT, "content_sha256": "zzz"}
    j = judge((a, b), {}, {"a": {"local-embed": IDENT}, "b": {"local-embed": other}})
    assert j[("a", "local-embed")].verdict is Verdict.ACCEPTED
    assert j[("b", "local-embed")].verdict is Verdict.REFUSED
    assert "remote 'a'" in j[("b", "local-embed")].reason
    j = judge((a, b), {}, {"a": None, "b": {"local-embed": other}})  # a down: b is the reference
    assert j[("b", "local-embed")].verdict is Verdict.ACCEPTED


def test_a_new_name_needs_no_identity():
    a = remote("a", ("local-embed", "studio-embed"))
    assert judge((a,), {"local-embed": IDENT}, {"a": None})[
        ("a", "local-embed")].verdict is Verdict.ACCEPTED


def test_a_restart_over_there_keeps_the_last_identity():
    old = {"local-embed": IDENT}
    merged = merge_identities(old, {"local-embed": {"content_sha256": None, "mode": "embedding"}})
    assert merged["local-embed"] == IDENT
    changed = merge_identities(old, {"local-embed": {**IDENT, "content_sha256": "new"}})
    assert changed["local-embed"]["content_sha256"] == "new"


# ----- config generation ------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path) -> StatePaths:
    from mlx_stack.config.proxykey import ensure_key

    ensure_key(tmp_path / "proxy.key")
    (tmp_path / "remotes").mkdir()
    key = tmp_path / "remotes" / "studio.key"
    key.write_text("sk-remote-secret-0123456789\n")
    key.chmod(0o644)
    return StatePaths(tmp_path)


def test_the_proxy_config_names_each_remote_model_and_never_its_key(home):
    stack = parse(BASE + REMOTES)
    plan = build_plan(stack, home)
    assert (home.home / "remotes" / "studio.key").stat().st_mode & 0o077 == 0  # repaired
    text = plan.proxy.config_file[1]
    assert "sk-remote-secret" not in text and "sk-remote-secret" not in repr(plan)
    config = yaml.safe_load(text)
    remote_ds = [d for d in config["model_list"] if d["model_info"].get("mlx_stack_remote")]
    assert [(d["model_name"], d["litellm_params"]["model"], d["model_info"]["mode"])
            for d in remote_ds] == [("standard", "openai/standard", "chat"),
                                    ("local-embed", "openai/local-embed", "embedding"),
                                    ("big", "openai/fast", "chat")]
    for d in remote_ds:
        assert d["litellm_params"]["api_base"] == "http://192.168.1.20:4000/v1"
        assert d["litellm_params"]["api_key"] == "os.environ/MLX_STACK_REMOTE_KEY_0"
    assert plan.proxy.secret_env["MLX_STACK_REMOTE_KEY_0"] == "sk-remote-secret-0123456789"
    shared = {d["model_name"] for d in config["model_list"]
              if d["model_info"].get("allowed_fails") == 0}
    assert shared == {"standard", "local-embed", "big"}
    assert {d["model_name"] for d in config["model_list"]
            if d["model_info"].get("health_check_max_tokens") == 1} == {"standard", "big"}
    general = config["general_settings"]
    assert general["enable_health_check_routing"] is True
    assert general["background_health_check_model_groups"] == ["big", "local-embed", "standard"]
    routes = json.loads(plan.proxy.env["MLX_STACK_ROUTES"])
    assert "local-embed" not in routes and "standard" not in routes  # the router's, not the gate's
    assert plan.remotes[0].remote.name == "studio" and "sk-" not in repr(plan.remotes)


def test_a_model_change_leaves_the_proxy_definition_alone(home):
    """The identity route names no model: replicas roll a model change without the proxy."""
    other = BASE.replace("model: all-minilm-l6-v2", "model: bge-small-en-v1.5")
    one, two = (build_plan(parse(t), home).proxy for t in (BASE, other))
    assert one.fingerprint == two.fingerprint


def test_a_stack_without_remotes_keeps_its_config(home):
    stack = parse(BASE)
    config = build_config(stack, {})
    assert "enable_health_check_routing" not in config["general_settings"]
    assert all("allowed_fails" not in d["model_info"] for d in config["model_list"])


def test_a_missing_remote_key_file_stops_the_plan_with_what_to_do(tmp_path):
    from mlx_stack.config.proxykey import ensure_key

    ensure_key(tmp_path / "proxy.key")
    with pytest.raises(StateError, match=r"remote 'studio': no key file at .*mlx-stack key"):
        build_plan(parse(BASE + REMOTES), StatePaths(tmp_path))


def test_the_launcher_leaves_out_vector_models_not_accepted(home, tmp_path):
    stack = parse(BASE + REMOTES)
    config = build_config(stack, {})
    names = lambda c: [(d["model_name"], d["model_info"].get("mlx_stack_remote"))  # noqa: E731
                       for d in c["model_list"]]
    assert ("local-embed", "studio") not in names(filter_config(config, frozenset()))
    assert ("local-embed", "studio") in names(filter_config(config,
                                                            frozenset({"studio/local-embed"})))
    assert ("standard", "studio") in names(filter_config(config, frozenset()))  # chat: always
    cfg = tmp_path / "litellm.yaml"
    cfg.write_text(render_config(config))
    out = effective_config(cfg, tmp_path / "absent.json")  # no verdicts: none accepted
    assert out.stat().st_mode & 0o077 == 0
    assert ("local-embed", "studio") not in names(yaml.safe_load(out.read_text()))
    (tmp_path / "remotes.json").write_text('{"accepted": ["studio/local-embed"]}')
    kept = yaml.safe_load(effective_config(cfg, tmp_path / "remotes.json").read_text())
    assert ("local-embed", "studio") in names(kept)


def test_the_fast_lane_steps_aside_for_a_name_another_host_serves(home, tmp_path):
    cfg = tmp_path / "litellm.yaml"
    cfg.write_text(render_config(build_config(parse(BASE + REMOTES), {})))
    assert fastlane.upstreams_from_config(cfg) == {}
    cfg.write_text(render_config(build_config(parse(BASE), {})))
    assert set(fastlane.upstreams_from_config(cfg)) == {"local-embed"}


def test_tls_files_reach_litellm_and_the_probe_speaks_https(home):
    stack = parse(BASE.replace("  port: 4000\n", "  port: 4000\n  tls: {cert_file: c.pem, "
                               "key_file: k.pem}\n"))
    plan = build_plan(stack, home)
    argv = plan.proxy.argv
    assert argv[argv.index("--ssl_certfile_path") + 1] == str(home.home / "c.pem")
    assert argv[argv.index("--ssl_keyfile_path") + 1] == str(home.home / "k.pem")
    assert plan.proxy.probe.url.startswith("https://127.0.0.1:")
    with pytest.raises(ConfigError, match=r"proxy.tls: missing required key 'key_file'"):
        parse(BASE.replace("  port: 4000\n", "  port: 4000\n  tls: {cert_file: c.pem}\n"))


def test_exposure_says_whether_the_wire_is_encrypted():
    plain = parse(BASE.replace("  port: 4000\n", "  port: 4000\n  host: 0.0.0.0\n"))
    assert "unencrypted" in plain.proxy.exposure() and "firewall" in plain.proxy.exposure()
    tls = parse(BASE.replace("  port: 4000\n", "  port: 4000\n  host: 0.0.0.0\n  tls: "
                             "{cert_file: c.pem, key_file: k.pem}\n"))
    assert "over HTTPS" in tls.proxy.exposure() and "unencrypted" not in tls.proxy.exposure()


# ----- the supervisor's prober, on fakes ------------------------------------------------------


class FakeRemotes:
    """Scripted answers of remote proxies and of the local embeddings server's card."""

    def __init__(self) -> None:
        self.answers: dict[str, RemoteCheck] = {}
        self.local: dict | None = dict(IDENT)
        self.calls = 0

    def check(self, target: RemoteTarget) -> RemoteCheck:
        self.calls += 1
        return self.answers.get(target.remote.name, RemoteCheck(False, problem="refused"))

    def card(self, _probe) -> dict | None:
        return self.local


def scenario(tmp_path: Path, fake: FakeRemotes) -> Scenario:
    from mlx_stack.supervisor.loop import InlineExecutor

    sc = Scenario(tmp_path, spec("embeddings", ServiceKind.EMBEDDINGS), start=False)
    r = remote("b", EMBED, ("standard", "standard"))
    plan = sc.current_plan
    sc.plan = Plan(plan.model_servers, plan.proxy, {}, remotes=(RemoteTarget(r, "sk-b"),))
    sc.sup.remote_prober = RemoteProber(InlineExecutor(), fake.check, fake.card, interval_s=1.0)
    sc.sup.load_initial()
    return sc


def ok(ident: dict) -> RemoteCheck:
    return RemoteCheck(True, True, 3.0, {"local-embed": ident, "standard": {"mode": "chat"}})


def test_a_matching_remote_joins_and_a_change_restarts_the_proxy(tmp_path):
    fake = FakeRemotes()
    fake.answers["b"] = ok(IDENT)
    sc = scenario(tmp_path, fake)
    sc.until(sc.all_ready, what="all ready")
    verdicts = json.loads(sc.rt.files[sc.paths.run / "remotes.json"])
    assert verdicts == {"accepted": ["b/local-embed"]}
    first_proxy = sc.rt.child("proxy")
    (status,) = sc.snapshot().remotes
    assert (status.reachable, status.authorised, status.latency_ms) == (True, True, 3.0)
    assert [(m.name, m.verdict) for m in status.models] == [
        ("local-embed", "accepted"), ("standard", "accepted")]
    # B goes down: nothing changes here (LiteLLM routes around it), no restart.
    fake.answers["b"] = RemoteCheck(False, problem="not reachable (ConnectError)")
    sc.run(3.0)
    assert sc.rt.child("proxy") is first_proxy and sc.state("proxy") is ServiceState.READY
    assert sc.snapshot().remotes[0].reachable is False
    assert sc.snapshot().remotes[0].models[0].verdict == "accepted"
    # B comes back with another model: refused, the proxy restarts without it.
    fake.answers["b"] = ok({**IDENT, "content_sha256": "other"})
    sc.until(lambda: sc.rt.child("proxy") is not first_proxy and sc.all_ready(),
             what="proxy restarted")
    assert json.loads(sc.rt.files[sc.paths.run / "remotes.json"]) == {"accepted": []}
    model = sc.snapshot().remotes[0].models[0]
    assert model.verdict == "refused" and "content_sha256: local 'abc'" in model.reason


def test_the_proxy_waits_for_a_first_verdict_but_not_for_ever(tmp_path):
    fake = FakeRemotes()
    fake.local = None  # the local server has not reported its identity
    sc = scenario(tmp_path, fake)
    sc.run(5.0)
    assert sc.state("embeddings") is ServiceState.READY
    assert sc.state("proxy") is ServiceState.STOPPED
    sc.until(lambda: sc.state("proxy") is ServiceState.READY, within=20, what="proxy starts")
    (status,) = sc.snapshot().remotes
    assert status.reachable is False and status.models[0].verdict == "pending"


def test_an_unauthorised_remote_shows_as_such(tmp_path):
    fake = FakeRemotes()
    fake.answers["b"] = RemoteCheck(True, False, 2.0, problem="unauthorised: the key ...")
    sc = scenario(tmp_path, fake)
    sc.until(sc.all_ready, within=30)
    (status,) = sc.snapshot().remotes
    assert status.authorised is False and status.problem.startswith("unauthorised")


def test_remote_statuses_survive_the_snapshot_file():
    from mlx_stack.contract.snapshot import RemoteModelStatus, RemoteStatus

    r = RemoteStatus("b", "http://b:4000", 12.0, True, False, 4.5, "unauthorised",
                     (RemoteModelStatus("local-embed", "local-embed", "pending", "why"),))
    snap = SupervisorSnapshot(pid=1, create_time=1.0, argv=("x",), started_at=1.0, remotes=(r,))
    back = SupervisorSnapshot.from_json(json.loads(snapshot_text(snap)))
    assert back.remotes == (r,)


# ----- the proxy's identity route, in process ------------------------------------------------


def call_route(route, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET"):
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    asyncio.run(route({"type": "http", "method": method, "path": path, "headers": headers},
                      receive, send))
    status = sent[0]["status"] if sent else None
    body = json.loads(sent[1]["body"]) if len(sent) > 1 else None
    return status, body


def test_the_identity_route_needs_the_key_and_lists_local_names():
    from mlx_stack.litellm.identity import IdentityRoute

    passed: list[str] = []

    async def app(scope, receive, send):
        passed.append(scope["path"])

    sources = {"standard": {"mode": "chat"},
               "local-embed": {"mode": "embedding",
                               "url": "http://127.0.0.1:9"}}  # nothing listens on port 9
    route = IdentityRoute(app, sources, key="sk-right-key-0123456789", backend_key="b")
    assert call_route(route, "/mlx-stack/v1/identity", [])[0] == 401
    wrong = [(b"authorization", b"Bearer sk-wrong")]
    assert call_route(route, "/mlx-stack/v1/identity", wrong)[0] == 401
    right = [(b"authorization", b"Bearer sk-right-key-0123456789")]
    assert call_route(route, "/mlx-stack/v1/identity", right, "POST")[0] == 405
    status, body = call_route(route, "/mlx-stack/v1/identity", right)
    assert status == 200
    assert body["models"]["standard"] == {"mode": "chat"}
    embed = body["models"]["local-embed"]
    assert embed["ready"] is False and "did not answer" in embed["problem"]
    assert "content_sha256" not in embed  # unknown: never reported as a value
    call_route(route, "/v1/models", right)
    assert passed == ["/v1/models"]


def test_a_remotes_external_embeddings_server_is_refused_with_why_not_left_pending():
    """A remote whose embeddings tier is an external server (Ollama) has no weights hash: its
    vectors can never be proven to match, so it is refused and says so (it stayed `pending`
    forever, with a reason about loading); a switch to it replaces the last identity known."""
    from mlx_stack.config.remotes import merge_identities

    a = remote("a", EMBED)
    external = {"a": {"local-embed": {"mode": "embedding", "external": True, "ready": False}}}
    for local in ({"local-embed": IDENT}, {}):
        j = judge((a,), local, external)[("a", "local-embed")]
        assert j.verdict is Verdict.REFUSED
        assert "external server" in j.reason and "no weights hash" in j.reason
    merged = merge_identities({"local-embed": IDENT}, external["a"])
    assert merged["local-embed"].get("external") is True
    loading = merge_identities({"local-embed": IDENT}, {"local-embed": {"mode": "embedding"}})
    assert loading["local-embed"] == IDENT


def test_the_identity_route_marks_an_external_embeddings_tier(tmp_path):
    import textwrap

    from mlx_stack.config.catalog import load_catalog
    from mlx_stack.config.plan import identity_sources
    from mlx_stack.config.stackfile import parse_stack_text

    text = textwrap.dedent("""\
        version: 1
        tiers: {}
        embeddings:
          backend: ollama
          model: nomic-embed-text
        """)
    stack = parse_stack_text(text, tmp_path / "stack.yaml", load_catalog(), "Linux")
    sources = identity_sources(stack)
    assert sources["local-embed"] == {"mode": "embedding", "external": "yes"}
    from mlx_stack.litellm.identity import IdentityRoute

    async def app(scope, receive, send):
        raise AssertionError("the route answers itself")

    route = IdentityRoute(app, sources, key="sk-right-key-0123456789", backend_key="b")
    right = [(b"authorization", b"Bearer sk-right-key-0123456789")]
    status, body = call_route(route, "/mlx-stack/v1/identity", right)
    assert status == 200
    assert body["models"]["local-embed"] == {"mode": "embedding", "external": True}
