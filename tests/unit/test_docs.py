"""The docs against the code, so they cannot drift: no stack is started here.

- The generated parts (docs/configuration.md, the embedding model table, the snippet blocks)
  are what docs/gen_docs.py makes of the code now.
- Every Field list of the stack file and catalog schemas is a table of the reference.
- Every message quoted in docs/troubleshooting.md exists in mlx_stack/, and every exit code
  is explained there.
- Every `mlx-stack` command and option the docs show exists; every relative link resolves.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mlx_stack import errors
from mlx_stack.cli.main import main as cli
from mlx_stack.config import catalog, stackfile
from mlx_stack.config.schema import Field

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OURS = ["clients.md", "configuration.md", "embeddings.md", "operations.md", "troubleshooting.md"]


def load_gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", DOCS / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = load_gen()


def test_generated_parts_are_current():
    stale = [str(p.relative_to(ROOT)) for p in gen.stale_docs()]
    assert not stale, f"{stale} differ from the code: run `python docs/gen_docs.py`"


def test_the_check_notices_a_stale_block(tmp_path):
    doc = tmp_path / "doc.md"
    text = "<!-- snippet: examples/clients/openai_chat.py -->\nold text\n<!-- /snippet -->\n"
    filled = gen.fill_blocks(text, doc)
    assert filled != text and (ROOT / "examples/clients/openai_chat.py").read_text() in filled
    assert gen.fill_blocks(filled, doc) == filled


def field_lists(module: ModuleType) -> dict[str, list[Field]]:
    """The module's lists of Fields, except one that only starts others (shared fields)."""
    lists = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, list) and value and all(isinstance(f, Field) for f in value)
    }
    return {
        name: fields
        for name, fields in lists.items()
        if not any(len(o) > len(fields) and o[: len(fields)] == fields for o in lists.values())
    }


def reference_tables() -> list[list[tuple[str, ...]]]:
    """The key tables of docs/configuration.md: rows of (key, type, default)."""
    tables: list[list[tuple[str, ...]]] = []
    current: list[tuple[str, ...]] = []
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            current.append(tuple(c.strip() for c in line.strip("|").split(" | ")[:3]))
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


@pytest.mark.parametrize("module", [stackfile, catalog], ids=["stackfile", "catalog"])
def test_every_schema_field_list_is_a_table_of_the_reference(module):
    tables = reference_tables()
    lists = field_lists(module)
    assert len(lists) >= 4
    for name, fields in lists.items():
        rows = [(f"`{f.name}`", f.type_name, gen._default(f)) for f in fields]
        assert rows in tables, f"{module.__name__}.{name} is not documented in configuration.md"


def source_literals() -> list[str]:
    """Every string literal in mlx_stack/; an f-string's values become NUL characters."""
    out: list[str] = []
    for path in (ROOT / "mlx_stack").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                out.append(
                    "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def quoted_messages(text: str) -> list[str]:
    """The code spans that open a table row: the messages troubleshooting.md explains."""
    out = []
    for line in text.splitlines():
        cell = line.split(" | ")[0].removeprefix("| ").strip() if line.startswith("| ") else ""
        if cell.startswith("``"):
            out.append(cell[2:-2].strip())
        elif cell.startswith("`"):
            out.append(cell[1:-1])
    return out


def found_in(message: str, literals: list[str]) -> bool:
    """True if one literal holds the message's pieces (split at …) in order."""
    pieces = [p for p in message.split("…") if p.strip()]
    for lit in literals:
        at = 0
        for piece in pieces:
            at = lit.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return True
    return False


def test_every_message_in_troubleshooting_exists_in_the_code():
    messages = quoted_messages((DOCS / "troubleshooting.md").read_text())
    assert len(messages) > 40
    literals = source_literals()
    missing = [m for m in messages if not found_in(m, literals)]
    assert not missing, f"troubleshooting.md quotes messages the code no longer has: {missing}"


def test_the_message_check_can_fail():
    literals = ["port \0 is held by \0; stop it"]
    assert found_in("port … is held by …", literals)
    assert not found_in("port … is taken by …", literals)
    assert not found_in("is held by … port", literals)  # order matters


def test_every_exit_code_is_explained():
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.MlxStackError)
    }
    text = (DOCS / "troubleshooting.md").read_text()
    documented = {int(c) for c in re.findall(r"^\| (\d+) \| ", text, re.M)}
    assert codes <= documented, f"exit codes {codes - documented} are not in troubleshooting.md"


def code_texts(text: str) -> list[str]:
    """Fenced code lines and inline code spans of a Markdown text."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    spans = re.findall(r"``(.+?)``|`([^`\n]+)`", rest)
    return [ln for b in blocks for ln in b.splitlines()] + [a or b for a, b in spans]


def cli_uses(text: str) -> list[tuple[str, list[str]]]:
    """(command, options) of every `mlx-stack COMMAND ...` shown as code."""
    out = []
    for code in code_texts(text):
        starts = r"(?:^|(?<=\$\()|(?<=`)|(?<=&& ))"  # a command, not prose such as "this mlx-stack"
        for m in re.finditer(starts + r"mlx-stack ([a-z][a-z-]*)((?: [^\s#;|&)`]+)*)", code):
            options = [t.split("=")[0] for t in m[2].split() if t.startswith("-")]
            out.append((m[1], options))
    return out


@pytest.mark.parametrize("doc", OURS)
def test_every_command_and_option_shown_exists(doc):
    for command, options in cli_uses((DOCS / doc).read_text()):
        assert command in cli.commands, f"{doc}: `mlx-stack {command}` is not a command"
        known = {o for p in cli.commands[command].params for o in p.opts} | {"-h", "--help"}
        unknown = set(options) - known
        assert not unknown, f"{doc}: `mlx-stack {command}` has no option {unknown}"


def test_the_command_check_can_fail():
    text = "`mlx-stack logs proxy -f --nope`, `~/.mlx-stack/x`, `this mlx-stack reads 1`"
    assert cli_uses(text + "\n```\nKEY=$(mlx-stack key)\n```\n") == [
        ("key", []),
        ("logs", ["-f", "--nope"]),
    ]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", OURS)
def test_relative_links_resolve(doc):
    path = DOCS / doc
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{doc}: broken link {target}"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{doc}: no heading for {target}"


def test_every_client_example_is_in_a_doc():
    shown = "".join((DOCS / d).read_text() for d in OURS)
    for example in sorted((ROOT / "examples" / "clients").glob("*.py")):
        marker = f"<!-- snippet: {example.relative_to(ROOT).as_posix()} -->"
        assert marker in shown, f"{example.name} is in no doc"


def test_the_architecture_doc_names_every_package_and_module_of_the_tree():
    """docs/architecture.md's package table matches mlx_stack/: no module missing or invented."""
    text = (DOCS / "architecture.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented: set[str] = set()
    for row in rows:
        first, _, rest = row[2:].partition("|")
        pkg = first.strip().strip("`").rstrip("/")
        if not (ROOT / "mlx_stack" / pkg).is_dir():
            continue
        for name in re.findall(r"`([\w/]+(?:\.py|\.cpp|/))`", rest):
            documented.add(f"{pkg}/{name}".rstrip("/"))
    tree = {p.relative_to(ROOT / "mlx_stack").as_posix()
            for p in (ROOT / "mlx_stack").rglob("*") if p.suffix in (".py", ".cpp")
            and p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts
            and len(p.relative_to(ROOT / "mlx_stack").parts) > 1}
    subpackages = {p.rsplit("/", 1)[0] for p in tree if p.count("/") > 1}
    expected = {p for p in tree if p.count("/") == 1} | subpackages
    assert documented, "no package table found"
    missing = sorted(expected - documented)
    invented = sorted(d for d in documented - expected if not (ROOT / "mlx_stack" / d).exists())
    assert not missing, f"modules the architecture doc does not name: {missing}"
    assert not invented, f"the architecture doc names what does not exist: {invented}"
    top = {p.name for p in (ROOT / "mlx_stack").glob("*.py") if p.name != "__init__.py"}
    assert all(f"`{name}`" in text for name in top), sorted(top)
