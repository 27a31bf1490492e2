"""Stack file validation: bad input is refused with file, line and field, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.stackfile import parse_stack_text, render_stack
from mlx_stack.errors import ConfigError

CATALOG = load_catalog()
GOOD = """\
version: 1
tiers:
  standard:
    model: qwen3-8b
    port: 8000
  fast:
    model: qwen3-1.7b
    quant: 4bit
    port: 8001
    backend: mlx-lm
embeddings:
  model: all-minilm-l6-v2
  port: 8003
proxy:
  port: 4000
"""


def parse(text: str, system: str = "Linux"):
    return parse_stack_text(text, Path("stack.yaml"), CATALOG, system)


def test_good_file_parses_with_defaults():
    s = parse(GOOD)
    assert [t.name for t in s.tiers] == ["standard", "fast"]
    assert s.tiers[0].quant == "4bit-dwq"  # the model's first quantisation
    assert s.embeddings is not None and s.embeddings.quant == "fp32"
    assert s.proxy.host == "127.0.0.1" and s.proxy.key_file == "proxy.key"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("model: qwen3-8b", "model: qwen3-8"), ["stack.yaml:4:", "unknown model", "qwen3-8b"]),
        (("quant: 4bit", "quant: 3bit"), ["stack.yaml:8:", "no quantisation '3bit'"]),
        (("port: 8001", "port: 8000"), ["port 8000 is used by both 'standard' and 'fast'"]),
        (("port: 8001", "port: 80"), ["port 80 is out of range"]),
        (("port: 8001", "port: 70000"), ["out of range"]),
        (("port: 8001", "port: '8001'"), ["expected integer, got string"]),
        (("port: 8001", "port: yes"), ["expected integer, got boolean"]),
        (("    backend: mlx-lm", "    backend: llama.cpp"), ["unknown backend 'llama.cpp'"]),
        (("    backend: mlx-lm", "    backend: vllm-mlx"), ["vllm-mlx runs on macOS only"]),
        (("  port: 4000", "  prot: 4000"), ["unknown key 'prot'", "did you mean 'port'"]),
        (("model: all-minilm-l6-v2", "model: qwen3-8b"), ["is a chat model, not an embedding"]),
        (("model: qwen3-1.7b", "model: all-minilm-l6-v2"), ["is an embedding model, not a chat"]),
        (("  fast:", "  Fast!:"), ["tier name"]),
        (("  fast:", "  proxy:"), ["'proxy' is reserved"]),
        (("version: 1", "version: 2"), ["unsupported version 2"]),
        (("  port: 4000", "  port: 4000\n  host: localhost"), ["not an IP address"]),
    ],
)
def test_bad_stack_files(edit, expected):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(ConfigError) as err:
        parse(text)
    msg = str(err.value)
    assert "nothing was started or changed" in msg
    for part in expected:
        assert part in msg


def test_all_problems_reported_at_once():
    text = GOOD.replace("model: qwen3-8b", "model: nope").replace("port: 8003", "port: 1")
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert len(err.value.problems) == 2


def test_vllm_mlx_is_accepted_on_macos():
    s = parse(GOOD.replace("    backend: mlx-lm", "    backend: vllm-mlx"), system="Darwin")
    assert s.tier("fast").backend == "vllm-mlx"


def test_empty_and_non_mapping_files():
    empty = parse("")
    assert empty.tiers == () and empty.embeddings is None and empty.proxy.port == 4000
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse("- a\n- b\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        parse("tiers: {standard: [\n")


def test_render_round_trips():
    s = parse(GOOD)
    again = parse(render_stack(s, header="test"))
    assert again.tiers == s.tiers and again.embeddings == s.embeddings and again.proxy == s.proxy


def test_example_stack_file_is_valid():
    """stack.example.yaml documents every key; it must stay loadable."""
    example = Path(__file__).resolve().parents[2] / "stack.example.yaml"
    s = parse_stack_text(example.read_text(), example, CATALOG, "Linux")
    assert s.tiers and s.embeddings is not None


def test_render_keeps_watchdog_settings():
    s = parse(GOOD + "watchdog:\n  probe_interval_s: 2\n  log_max_mb: 5\n")
    text = render_stack(s)
    assert "probe_interval_s: 2" in text and "log_max_mb: 5" in text
    assert parse(text).watchdog == s.watchdog
    assert "watchdog:" not in render_stack(parse(GOOD))
