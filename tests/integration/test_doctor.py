"""`mlx-stack doctor` on this machine: real checks, each failure with its fix."""

from __future__ import annotations

import json
import socket

from stackenv import StackEnv, write_stack


def test_doctor_passes_on_a_good_stack(tmp_path):
    env = write_stack(tmp_path / "home", None)
    res = env.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert res.returncode == 0, res.stdout
    assert checks["mlx"]["level"] == "ok" and "cpu" in checks["mlx"]["detail"].lower()
    assert checks["model embeddings"]["level"] == "ok"
    assert checks["proxy key"]["level"] == "ok"
    assert checks["blas"]["level"] in ("ok", "warn")
    engine = checks["embeddings engine"]  # onnxruntime is a dependency on Linux
    assert engine["level"] == "ok" and engine["detail"].startswith(("auto", "MLX (Apple"))


def test_doctor_names_each_problem_with_a_fix(tmp_path):
    env = write_stack(tmp_path / "home", None)
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text().replace("all-minilm-l6-v2", "bge-small-en-v1.5"))
    (env.home / "proxy.key").chmod(0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", env.ports["proxy"]))
        s.listen()
        res = env.cli("doctor", "--json")
    assert res.returncode == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert checks["model embeddings"]["level"] == "fail"
    assert "mlx-stack pull bge-small-en-v1.5" in checks["model embeddings"]["fix"]
    assert checks["proxy key"]["level"] == "warn" and "chmod 600" in checks["proxy key"]["fix"]
    port = checks[f"port {env.ports['proxy']}"]
    assert port["level"] == "fail" and "held by pid" in port["detail"]
    text = env.cli("doctor").stdout
    assert "fix: " in text


def test_doctor_without_a_stack_file(tmp_path):
    res = StackEnv(tmp_path / "none", {}).cli("doctor")
    assert res.returncode == 1 and "mlx-stack init" in res.stdout and "Traceback" not in res.stderr


def test_a_proxy_bound_beyond_loopback_is_a_warning_in_doctor_and_status(tmp_path):
    env = write_stack(tmp_path / "home", None)
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text().replace("proxy:\n", "proxy:\n  host: 0.0.0.0\n"))
    checks = {c["name"]: c for c in json.loads(env.cli("doctor", "--json").stdout)}
    assert checks["exposure"]["level"] == "warn"
    assert "reachable from other machines" in checks["exposure"]["detail"]
    assert "127.0.0.1" in checks["exposure"]["fix"]
    status = json.loads(env.cli("status", "--json").stdout)
    assert any("reachable from other machines" in w for w in status["warnings"])
    stack.write_text(stack.read_text().replace("  host: 0.0.0.0\n", ""))
    checks = {c["name"]: c for c in json.loads(env.cli("doctor", "--json").stdout)}
    assert checks["exposure"]["level"] == "ok"


def test_doctor_checks_the_port_of_each_replica(tmp_path):
    env = write_stack(tmp_path / "home", None, replicas=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", env.ports["embeddings-3"]))
        s.listen()
        res = env.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert res.returncode == 1
    held = checks[f"port {env.ports['embeddings-3']}"]
    assert held["level"] == "fail" and held["detail"].startswith("embeddings-3's port is held")
    for name in ("embeddings", "embeddings-2"):
        check = checks[f"port {env.ports[name]}"]
        assert check["level"] == "ok" and check["detail"] == f"free for {name}"
