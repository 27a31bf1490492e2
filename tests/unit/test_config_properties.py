"""Property tests: any stack file or catalog file loads, or is refused with ``file:line``.

Through the entry points the CLI and the supervisor use (``load_stack``, ``load_catalog``), a
file of random text or bytes, or a valid file mutated at random, must either load or raise
``ConfigError`` whose every problem names the file and (see ``WHOLE_FILE``) its line. Any other
exception, a traceback for the user, fails the property. A stack that loads must also plan
(as `up` does), and a catalog that loads must have finite numbers and sources that can be
looked up (as `mlx-stack models` does).

260 examples in all, ~3 s, derandomized: CI sees the same cases on every run. Bugs these
properties found are kept below as plain regression tests, each with its minimal input.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.plan import build_plan
from mlx_stack.config.sources import locate, parse_source
from mlx_stack.config.stackfile import Stack, load_stack
from mlx_stack.config.yamlfile import MAX_BYTES, MAX_DEPTH
from mlx_stack.errors import ConfigError, MlxStackError
from mlx_stack.paths import StatePaths

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog()
EXAMPLE_STACK = yaml.safe_load((ROOT / "stack.example.yaml").read_text())
SHIPPED_CATALOG = {
    "models": [
        *yaml.safe_load((ROOT / "catalog" / "chat.yaml").read_text())["models"][:1],
        *yaml.safe_load((ROOT / "catalog" / "embedding.yaml").read_text())["models"][:1],
    ]
}

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the dumps cost most
SCALE = float(os.environ.get("MLX_STACK_PROPERTY_SCALE", "1"))
"""Multiplies every example count: ``MLX_STACK_PROPERTY_SCALE=50`` for a long hunt, not for CI."""


def examples(n: int) -> settings:
    """``n`` examples, the same ones on every run (derandomized, no example database)."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# The only problems that may lack a line: each is about the whole file, not a place in it.
WHOLE_FILE = (
    "expected a mapping, got null",  # an empty file, or only comments: no line holds anything
    "refused: the document expands to",  # an alias bomb: the size of the whole expansion
    "characters; the limit is",  # over MAX_BYTES (characters): refused before it is parsed
    "larger than",  # over MAX_BYTES (bytes): refused unread
    "refused: nested too deeply",  # Python's recursion limit: no node is known at that point
)


def assert_clear(exc: ConfigError, path: Path, text: str | None) -> None:
    """Each problem starts with ``path:LINE:`` (a real line of ``text``), or is a WHOLE_FILE one."""
    assert str(exc).startswith(f"{path}: "), str(exc)
    assert exc.problems, str(exc)
    last = len(text.splitlines()) + 1 if text is not None else None  # YAML breaks are a subset
    for problem in exc.problems:
        assert "Traceback" not in problem
        found = re.match(rf"{re.escape(str(path))}:(\d+): \S", problem)
        if found is None:
            assert problem.startswith(f"{path}: "), problem
            assert any(w in problem for w in WHOLE_FILE), f"no file:line in {problem!r}"
        elif last is not None:
            assert 1 <= int(found[1]) <= last, problem


def decoded(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------- strategies

TOKENS = [
    "version", "tiers", "standard", "model", "quant", "port", "backend", "embeddings", "proxy",
    "auth", "key_file", "watchdog", "models", "name", "type", "source", "quantizations", "id",
    "memory_mb", "chat", "embedding", "qwen3-8b", "all-minilm-l6-v2", "8000", "1", "-1", "0x1F",
    "1e999", ".nan", ".inf", "1_000", "1:30", "9" * 5000, "yes", "~", "null", "2001-12-14",
    ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "-", "[", "]", "{", "}", ",", "? ",
    "&a ", "*a", "&b [*a, *a] ", "<<: ", "!!float ", "!!int ", "!!bool ", "!!timestamp ",
    "!!binary ", "!!set ", "!!str ", "!!map ", "!!python/object:os.system ", "!x ", "'", '"',
    "\\", "|\n", ">\n", "#", "---\n", "...\n", "%YAML 1.1\n", "\t", "\r", "\r\n", "\x00",
    "\x01", "\x7f", "\x85", "\u2028", "\ufeff", "\U0001f600", "é",
]  # fmt: skip

yamlish = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
any_text = st.one_of(yamlish, st.text(max_size=200), st.tuples(yamlish, st.text()).map("".join))
any_bytes = st.one_of(any_text.map(lambda t: t.encode("utf-8")), st.binary(max_size=200))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # nan and the infinities included
    st.text(max_size=30),
    st.sampled_from(["", " ", "qwen3-8b", "4bit", "mlx-lm", "127.0.0.1", "::", "8000", "a\x00b",
                     "~no-such-user/x", "path:~no-such-user/x", "path:", "hf:", "package:os/x",
                     "http://[::1", "*"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


def paths_in(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in ``doc`` (keys and list indexes), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_in(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_in(v, (*prefix, i))
    return out


def copy(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [copy(v) for v in doc]
    return doc


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> str:
    """``base`` with one to three random edits, dumped to YAML (some edits are made on the text)."""
    doc = copy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_in(doc)))
        edit = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if not path:
            if edit == "replace":
                doc = draw(values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if edit == "replace":
            parent[last] = draw(values)
        elif edit == "delete":
            del parent[last]
        elif edit == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(st.text(max_size=12), st.integers()))] = draw(values)
        elif edit == "add":
            parent.insert(last, draw(values))
        elif isinstance(parent, dict) and isinstance(last, str) and last:
            typo = last[:-1] + draw(st.sampled_from("sxz_"))  # a one-letter typo
            parent[typo] = parent.pop(last)
    text = yaml.dump(doc, Dumper=DUMPER, sort_keys=False, allow_unicode=True, width=1000)
    lines = text.splitlines(keepends=True)
    if lines and draw(st.booleans()):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["duplicate", "drop", "indent", "dedent", "token"]))
        if how == "duplicate":  # a duplicate key, or a repeated list entry
            lines.insert(i, lines[i])
        elif how == "drop":
            del lines[i]
        elif how == "indent":
            lines[i] = "  " + lines[i]
        elif how == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        else:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(TOKENS)) + lines[i][at:]
    return "".join(lines)


# ---------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> StatePaths:
    paths = StatePaths(tmp_path_factory.mktemp("home"))
    paths.user_catalog.mkdir()
    paths.key_file().write_text("sk-" + "k" * 40 + "\n")
    paths.key_file().chmod(0o600)
    return paths


def check_stack(paths: StatePaths, raw: bytes, system: str = "Linux") -> Stack | None:
    """Load ``raw`` as the stack file: a Stack that plans, or a clear ConfigError (else: fail)."""
    paths.stack_file.write_bytes(raw)
    try:
        stack = load_stack(paths.stack_file, CATALOG, system)
    except ConfigError as exc:
        assert_clear(exc, paths.stack_file, decoded(raw))
        return None
    numbers = [*vars(stack.proxy).values(), *vars(stack.watchdog).values()]
    assert all(math.isfinite(n) for n in numbers if isinstance(n, float)), numbers
    with contextlib.suppress(MlxStackError):  # e.g. no tier at all: refused as `up` shows it
        build_plan(stack, paths)
    return stack


def check_catalog(paths: StatePaths, raw: bytes) -> None:
    """Load ``raw`` as a user catalog file: entries whose sources can be looked up, or a clear
    ConfigError (else: fail)."""
    path = paths.user_catalog / "mine.yaml"
    path.write_bytes(raw)
    try:
        catalog = load_catalog(paths.user_catalog)
    except ConfigError as exc:
        assert_clear(exc, path, decoded(raw))
        return
    for entry in catalog:
        assert all(math.isfinite(getattr(entry, f, 0.0)) for f in ("params_b", "params_m",
                                                                    "mteb_score"))
        for q in entry.quantizations:
            for s in q.sources:
                if s.kind != "hf":  # the hub's cache is slow to ask; its ids are checked
                    locate(s)  # what `mlx-stack models` does to mark the models here


# ---------------------------------------------------------------- properties


@examples(100)
@given(raw=any_bytes, system=st.sampled_from(["Linux", "Darwin"]))
def test_random_stack_files_load_or_name_file_and_line(home: StatePaths, raw: bytes,
                                                       system: str) -> None:
    check_stack(home, raw, system)


@examples(50)
@given(raw=any_bytes)
def test_random_catalog_files_load_or_name_file_and_line(home: StatePaths, raw: bytes) -> None:
    check_catalog(home, raw)


@examples(60)
@given(text=mutated(EXAMPLE_STACK), system=st.sampled_from(["Linux", "Darwin"]))
def test_mutated_stack_files_load_or_name_file_and_line(home: StatePaths, text: str,
                                                        system: str) -> None:
    check_stack(home, text.encode("utf-8"), system)


@examples(50)
@given(text=mutated(SHIPPED_CATALOG))
def test_mutated_catalog_files_load_or_name_file_and_line(home: StatePaths, text: str) -> None:
    check_catalog(home, text.encode("utf-8"))


def test_the_bases_of_the_mutations_are_valid(home: StatePaths) -> None:
    """Mutating valid files is the point: a base that is already refused would test little."""
    dump = yaml.safe_dump
    assert check_stack(home, dump(EXAMPLE_STACK, sort_keys=False).encode()) is not None
    check_catalog(home, dump(SHIPPED_CATALOG, sort_keys=False).encode())
    assert "qwen3-8b" in load_catalog(home.user_catalog)


# ---------------------------------------------------------------- whole-file problems


def test_whole_file_problems_name_the_file(home: StatePaths) -> None:
    """The cases of WHOLE_FILE, each once: the file is named, and no line is made up."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True)
    )
    for raw, expected in [
        (b"", None),  # an empty stack file is an empty stack
        (b"# nothing here\n", None),
        (bomb.encode(), "values (nested aliases?)"),
        (b"#" * (MAX_BYTES + 1), "larger than"),
    ]:
        home.stack_file.write_bytes(raw)
        if expected is None:
            assert check_stack(home, raw) is not None
            continue
        with pytest.raises(ConfigError, match=re.escape(expected)) as err:
            load_stack(home.stack_file, CATALOG, "Linux")
        assert err.value.problems == [p for p in err.value.problems
                                      if p.startswith(f"{home.stack_file}: ")]
    path = home.user_catalog / "mine.yaml"
    path.write_bytes(b"# only a comment\n")
    with pytest.raises(ConfigError, match="expected a mapping, got null") as err:
        load_catalog(home.user_catalog)
    assert err.value.problems[0].startswith(f"{path}: ")
    path.unlink()


# ---------------------------------------------------------------- regressions found by the above
# Each is the minimal input of a bug the properties found: before the fix, the first row was a
# TypeError, the tags a ValueError, IndexError, KeyError or AttributeError, the NUL and the
# unknown user a ValueError or RuntimeError when `up` planned, and the others had no line.

STACK_REGRESSIONS = [
    ("? [a]\n: 1\n", ":1: malformed YAML: a list cannot be a key"),
    ("? {a: 1}\n: 1\n", ":1: malformed YAML: a dict cannot be a key"),
    ("version: !!int abc\n", ":1: malformed YAML: cannot read 'abc' as int"),
    ("version: !!int ''\n", ":1: malformed YAML: cannot read '' as int"),
    ("version: !!float ''\n", ":1: malformed YAML: cannot read '' as float"),
    ("version: !!bool abc\n", ":1: malformed YAML: cannot read 'abc' as bool"),
    ("version: !!timestamp abc\n", ":1: malformed YAML: cannot read 'abc' as timestamp"),
    ("version: !!timestamp 2001-13-01\n", ":1: malformed YAML: cannot read '2001-13-01' as "
     "timestamp (month must be in 1..12)"),
    ("version: " + "1" * 5000 + "\n", ":1: malformed YAML: cannot read '1111"),  # > 4300 digits
    ("version: 1\ntiers: \x01\n", ":2: malformed YAML: unacceptable character '\\x01'"),
    ("- a\n", ":1: expected a mapping, got list"),
    ("version: 1\n0x10: 1\n", ":2: 16: unknown key 16"),  # the line of a key that is no string
    ("version: 1\nnull: 1\n", ":2: None: unknown key None"),
    ('version: 1\n"": 1\n', ":2: unknown key ''"),  # no field path, but still its line
    ('version: 1\n"\\r": 1\n', ":2: '\\r': unknown key '\\r'"),  # a raw CR would hide the line
    ("watchdog: {log_max_mb: .inf}\n", ":1: watchdog.log_max_mb: expected a finite number"),
    ("proxy: {timeout_s: .nan}\n", ":1: proxy.timeout_s: expected a finite number, got nan"),
    ('proxy: {auth: {key_file: "a\\0b"}}\n', ":1: proxy.auth.key_file: 'a\\x00b' is not a"),
    ("proxy: {auth: {key_file: ~no-such-user/k}}\n", ":1: proxy.auth.key_file: '~no-such-user"),
    ("a:\n  " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", ":2: refused: the document "
     f"nested more than {MAX_DEPTH} levels deep"),
]


@pytest.mark.parametrize(("text", "expected"), STACK_REGRESSIONS)
def test_stack_file_regressions(home: StatePaths, text: str, expected: str) -> None:
    home.stack_file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_stack(home.stack_file, CATALOG, "Linux")
    assert f"{home.stack_file}{expected}" in str(err.value)


def test_undecodable_bytes_name_their_line(home: StatePaths) -> None:
    home.stack_file.write_bytes(b"version: 1\n# caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"stack\.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_stack(home.stack_file, CATALOG, "Linux")


QUANT = "    quantizations:\n      - {id: q, source: %s, memory_mb: 1}\n"
CHAT = ("models:\n  - name: x\n    type: chat\n    source: a/b\n    memory_mb: 1\n"
        "    params_b: %s\n    context_length: 1\n    tier_hint: fast\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CHAT % 1 + QUANT % "[1]", ":10: models[0].quantizations[0].source[0]: expected a string"),
        (CHAT % ".nan" + QUANT % "a/b", ":6: models[0].params_b: expected a finite number"),
        ("models: [1]\n", ":1: models[0]: expected a mapping, got integer"),
        ("- 1\n", ":1: expected a mapping, got list"),
        (b"models:\n- \xff\n", ":2: not UTF-8 text"),
    ],
)
def test_catalog_file_regressions(home: StatePaths, text: str | bytes, expected: str) -> None:
    path = home.user_catalog / "mine.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        with pytest.raises(ConfigError) as err:
            load_catalog(home.user_catalog)
        assert f"{path}{expected}" in str(err.value)
    finally:
        path.unlink()


def test_a_user_catalog_over_the_size_limit_is_refused_unread(home: StatePaths) -> None:
    path = home.user_catalog / "mine.yaml"
    path.write_bytes(b"#" * (MAX_BYTES + 1))
    try:
        with pytest.raises(ConfigError, match="larger than"):
            load_catalog(home.user_catalog)
    finally:
        path.unlink()


def test_a_path_source_in_the_home_of_an_unknown_user_is_not_here() -> None:
    """`mlx-stack models` and `up` look every source up: this one was a RuntimeError."""
    assert locate(parse_source("path:~no-such-user/model")) is None
