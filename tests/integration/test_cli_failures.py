"""What users see when things go wrong: clear messages, exit codes, nothing half-started.

Real processes where a service is involved; the hub is the one thing replaced (by a closed
local port), since no machine here can reach it.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from stackenv import StackEnv, write_stack

from mlx_stack import ports


def no_traceback(res) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr


def test_bad_stack_file_starts_nothing(tmp_path):
    env = write_stack(tmp_path / "home", None)
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text().replace("model: all-minilm-l6-v2", "model: all-minilm"))
    res = env.cli("up")
    assert res.returncode == 2
    assert "stack.yaml:4: embeddings.model: unknown model 'all-minilm'" in res.stderr
    assert "did you mean 'all-minilm-l6-v2'" in res.stderr
    no_traceback(res)
    assert not (env.home / "run" / "state.json").exists()
    assert not (env.home / "logs").exists()


def test_malformed_yaml_reports_the_line(tmp_path):
    env = write_stack(tmp_path / "home", None)
    (env.home / "stack.yaml").write_text("version: 1\ntiers:\n  standard: {model: x\n")
    res = env.cli("up")
    assert res.returncode == 2 and "malformed YAML" in res.stderr and "stack.yaml:" in res.stderr
    no_traceback(res)


def test_missing_stack_file_says_run_init(tmp_path):
    res = StackEnv(tmp_path / "empty", {}).cli("up")
    assert res.returncode == 2 and "mlx-stack init" in res.stderr
    no_traceback(res)


def test_a_port_held_by_another_program_is_named_before_anything_starts(tmp_path):
    env = write_stack(tmp_path / "home", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", env.ports["proxy"]))
        s.listen()
        res = env.cli("up")
    assert res.returncode == 3, res.stderr
    assert f"port {env.ports['proxy']} is held by pid" in res.stderr
    assert "python" in res.stderr  # the holder's name (this test process)
    no_traceback(res)
    state = env.home / "run" / "state.json"
    assert not state.exists() or json.loads(state.read_text())["services"] == {}
    assert ports.is_free(env.ports["embeddings"])


def test_a_service_that_dies_is_reported_with_exit_code_and_log(tmp_path):
    """A model folder whose architecture the embeddings server cannot run: it exits at once."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no_such_arch"}')
    env = write_stack(tmp_path / "home", None)
    (env.home / "catalog").mkdir()
    (env.home / "catalog" / "bad.yaml").write_text(f"""\
models:
  - name: bad-embed
    type: embedding
    source: local/bad
    architecture: bert
    params_m: 1
    dimensions: 8
    max_sequence_length: 16
    pooling: mean
    normalize: true
    mteb_score: 0
    memory_mb: 10
    quantizations:
      - {{id: fp32, source: "path:{bad}", memory_mb: 10}}
""")
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text().replace("all-minilm-l6-v2", "bad-embed"))
    try:
        t0 = time.monotonic()
        res = env.cli("up", timeout=300)
        assert time.monotonic() - t0 < 120
        assert res.returncode == 4, res.stderr
        assert "embeddings: fatal: exited during start with exit code 2" in res.stderr
        assert "no_such_arch" in res.stderr  # the child's own last log lines are shown
        no_traceback(res)
        st = {s["name"]: s["state"] for s in env.status()["services"]}
        # Restarting cannot fix a bad model folder: fatal at once, and the proxy never started
        # because no model server became ready.
        assert st["embeddings"] == "fatal" and st["proxy"] == "stopped"
    finally:
        env.cli("down")
        env.kill_everything()


def test_missing_weights_name_the_pull_command(tmp_path):
    env = write_stack(tmp_path / "home", None)
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text().replace("all-minilm-l6-v2", "bge-small-en-v1.5"))
    res = env.cli("up")
    assert res.returncode == 4
    assert "mlx-stack pull bge-small-en-v1.5 --quant fp32" in res.stderr
    no_traceback(res)


def test_pull_fails_fast_without_a_hub(tmp_path):
    """The hub is replaced by a closed local port: no network is ever used here."""
    env = StackEnv(tmp_path / "home", {})
    closed = ports.free_port()
    t0 = time.monotonic()
    import subprocess

    res = subprocess.run(
        [*__import__("stackenv").MLX_STACK, "pull", "bge-small-en-v1.5"],
        env={
            **env.env,
            "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert time.monotonic() - t0 < 60
    assert res.returncode == 6, res.stderr
    assert "could not download BAAI/bge-small-en-v1.5" in res.stderr
    no_traceback(res)


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--tier", "nosuch"],
        ["models", "--type", "vision"],
        ["pull", "no-such-model"],
        ["logs"],
    ],
)
def test_bad_arguments_are_explained(tmp_path, args):
    env = write_stack(tmp_path / "home", None)
    res = env.cli(*args)
    assert res.returncode != 0
    assert res.stderr.strip()
    no_traceback(res)


def test_a_stack_with_nothing_to_run_is_refused(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.home.mkdir(parents=True)
    (env.home / "stack.yaml").write_text("version: 1\n")
    res = env.cli("up")
    assert res.returncode == 2 and "nothing to run" in res.stderr
    no_traceback(res)
