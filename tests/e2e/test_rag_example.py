"""The RAG example (examples/rag/rag.py) against a real stack, with the commands of its doc.

The commands are read from docs/embeddings.md and run as a user would (in a scratch folder,
with MLX_STACK_URL pointing at this test's proxy); further checks call the script's ``main``
in this process, which is quicker. The paraphrase case is the point: "reduce endpoint latency"
must find the note titled "Optimize API response time", which has none of its words.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAG = ROOT / "examples" / "rag" / "rag.py"
CORPUS = ROOT / "examples" / "rag" / "corpus"
DOC = ROOT / "docs" / "embeddings.md"
RIGHT_NOTE = "api-performance.md"


def load_rag() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rag_example", RAG)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rag = load_rag()


def doc_commands() -> list[list[str]]:
    """The `python examples/rag/rag.py ...` lines of the doc's RAG section, as argv lists."""
    section = DOC.read_text().split("## Example: retrieval-augmented generation", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in the RAG section of docs/embeddings.md"
    lines = [ln for ln in block[1].splitlines() if ln.startswith("python examples/rag/rag.py")]
    return [
        [sys.executable] + [str(ROOT / a) if a.startswith("examples/") else a for a in argv[1:]]
        for argv in map(shlex.split, lines)
    ]


# ----- no stack needed ------------------------------------------------------------------------


def test_the_paraphrase_note_shares_no_word_with_the_query():
    text = (CORPUS / RIGHT_NOTE).read_text().lower()
    assert text.startswith("# optimize api response time")
    assert not {"reduce", "endpoint", "latency"} & set(re.findall(r"[a-z]+", text))


def test_chunks_are_packed_paragraphs_led_by_their_title(tmp_path):
    (tmp_path / "sub").mkdir()
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(8)]  # ~320 chars each
    (tmp_path / "sub" / "long.md").write_text("# Long note\n\n" + "\n\n".join(paragraphs))
    (tmp_path / "plain.txt").write_text("no heading here")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    chunks = rag.read_chunks(tmp_path)
    assert {c.source for c in chunks} == {"sub/long.md", "plain.txt"}
    long = [c for c in chunks if c.source == "sub/long.md"]
    assert len(long) >= 3
    assert all(len(c.text) <= rag.MAX_CHUNK_CHARS + len("# Long note\n\n") for c in long)
    assert long[0].text.startswith("# Long note") and long[1].text.startswith("Long note\n\n")
    assert "".join(c.text for c in long).count("Paragraph") == 8  # nothing lost, nothing twice
    assert [c.text for c in chunks if c.source == "plain.txt"] == ["plain\n\nno heading here"]


def test_a_paragraph_longer_than_a_chunk_is_cut_between_words(tmp_path):
    (tmp_path / "wall.md").write_text("# Wall\n\n" + "lorem ipsum " * 200)  # 2400 chars
    chunks = rag.read_chunks(tmp_path)
    assert len(chunks) >= 3
    assert all(len(c.text) <= rag.MAX_CHUNK_CHARS + len("# Wall\n\n") for c in chunks)
    assert chunks[0].text.startswith("# Wall\n\nlorem")  # no chunk of a title alone
    words = " ".join(c.text.removeprefix("Wall\n\n").removeprefix("# Wall\n\n") for c in chunks)
    assert words.split() == ("lorem ipsum " * 200).split()


@pytest.mark.parametrize("text", [None, "not json", "[]", '{"items": []}'])
def test_eval_refuses_a_file_that_is_not_a_questions_file(tmp_path, capsys, text):
    """Checked before the proxy is reached: one line naming the file, exit 1, no traceback."""
    questions = tmp_path / "q.json"
    if text is not None:
        questions.write_text(text)
    assert rag.main(["eval", str(questions), "--store", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {questions}: not a questions file") and "Traceback" not in err


def test_pick_chat_model():
    models = [{"id": "local-embed", "mode": "embedding"}, {"id": "fast", "mode": "chat"}]
    assert rag.pick_chat_model(models) == "fast"
    assert rag.pick_chat_model([{"id": "local-embed", "mode": "embedding"}]) is None
    assert rag.pick_chat_model([{"id": "local-embed"}, {"id": "other"}]) == "other"


# ----- against the live stack -----------------------------------------------------------------


@pytest.fixture(scope="module")
def env(live_stack) -> dict[str, str]:
    return dict(os.environ) | {
        "MLX_STACK_URL": live_stack.url("proxy") + "/v1",
        "MLX_STACK_KEY": live_stack.key(),
    }


@pytest.fixture(scope="module")
def indexed(env, tmp_path_factory) -> tuple[Path, str]:
    """A user's folder after the doc's `index` command: (the folder, the command's output)."""
    workdir = tmp_path_factory.mktemp("rag-user")
    index_cmd = doc_commands()[0]
    assert index_cmd[1:] == [str(RAG), "index", str(CORPUS)]
    res = subprocess.run(index_cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return workdir, res.stdout


@pytest.fixture
def workdir(indexed, env, monkeypatch) -> Path:
    """The indexed folder, with this process's environment set as the doc says."""
    for k in ("MLX_STACK_URL", "MLX_STACK_KEY"):
        monkeypatch.setenv(k, env[k])
    return indexed[0]


@pytest.mark.e2e
def test_the_documented_commands(env, indexed):
    workdir, index_out = indexed
    files = len(list(CORPUS.glob("*.md")))
    assert f"from {files} files into rag-index (384 dimensions)" in index_out
    assert (workdir / "rag-index" / "vectors.npy").is_file()
    ask_cmd = doc_commands()[1]
    assert ask_cmd[2:] == ["ask", "How do I reduce endpoint latency?"]
    res = subprocess.run(ask_cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hits = [ln for ln in res.stdout.splitlines() if re.match(r"\d+\. ", ln)]
    assert len(hits) == 4 and RIGHT_NOTE in hits[0], res.stdout
    answer = res.stdout.split("\nanswer (standard):\n", 1)
    assert len(answer) == 2 and answer[1].strip(), res.stdout + res.stderr


def ask_json(capsys, workdir: Path, *args: str) -> dict:
    assert rag.main(["ask", *args, "--store", str(workdir / "rag-index"), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.e2e
def test_paraphrase_ranks_first_and_the_chat_tier_answers(workdir, capsys):
    out = ask_json(capsys, workdir, "reduce endpoint latency", "--max-tokens", "8")
    hits = out["hits"]
    assert hits[0]["source"] == RIGHT_NOTE
    assert hits[0]["score"] > hits[1]["score"] + 0.1
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert out["chat_model"] == "standard" and out["chat_skipped"] is None
    assert isinstance(out["answer"], str) and out["answer"].strip()


@pytest.mark.e2e
def test_chat_step_is_skipped_not_fatal(workdir, capsys):
    out = ask_json(capsys, workdir, "reduce endpoint latency", "--chat-model", "no-such-tier")
    assert out["hits"][0]["source"] == RIGHT_NOTE
    assert out["answer"] is None and "no-such-tier" in out["chat_skipped"]
    out = ask_json(capsys, workdir, "restore last night's data", "--no-chat", "-k", "2")
    assert out["hits"][0]["source"] == "database-backups.md" and len(out["hits"]) == 2
    assert out["answer"] is None and out["chat_skipped"] == "--no-chat"


@pytest.mark.e2e
def test_an_index_from_another_model_is_refused(workdir, tmp_path, capsys, monkeypatch):
    """Simulate a model change: the stored fingerprint no longer matches the served model."""
    store = tmp_path / "stale"
    store.mkdir()
    for name in ("vectors.npy", "int8.npy", "bits.npy", "index.json"):
        (store / name).write_bytes((workdir / "rag-index" / name).read_bytes())
    meta = json.loads((store / "index.json").read_text())
    meta["fingerprint"] = meta["fingerprint"][1:] + meta["fingerprint"][:1]  # another vector
    (store / "index.json").write_text(json.dumps(meta))
    assert rag.main(["ask", "reduce endpoint latency", "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert "changed since this index was built" in err and "rebuild" in err
    monkeypatch.setenv("MLX_STACK_KEY", "sk-not-the-key-0123456789")
    assert rag.main(["ask", "x", "--store", str(workdir / "rag-index")]) == 1
    assert "refused the key" in capsys.readouterr().err
