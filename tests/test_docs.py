"""README.md and docs/: every code block runs, the README is two screens, the text tells the present.

The figures: tests/test_results.py (the study's), tests/test_benchmarks.py (the benchmarks').

Each page's ```python / ```bash blocks run in order, as a reader follows the page, in a fresh folder of their
own (offline, CPU), which holds what the pages assume of the reader: ``examples/`` and ``src/`` of this checkout,
and (except on the getting-started page, which makes them itself) ``my-model/`` (the study's pretrained base
with a chat template), ``train.jsonl``, ``test.jsonl``, ``prompts.jsonl`` and ``chat.jsonl``. ```json blocks
parse. A block that cannot run here is marked by ``<!-- not run: REASON -->`` on the line above its fence. A line
ending in ``# -> TEXT`` says what it prints: the block's output must contain TEXT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
RUN = {"python", "bash", "json"}
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {{ m['content'] }}\n"
    "{% else %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
PRINTS = re.compile(r"#\s*->\s*(.+?)\s*$", flags=re.M)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        found.append(Block(page, text[: m.start()].count("\n") + 1, m.group(1), m.group(2), reason and reason.group(1)))
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE_PAGES = [p for p in PAGES if any(b.lang in RUN and not b.not_run for b in blocks(p))]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture(scope="module")
def reader_files(tmp_path_factory) -> Path:
    """What the pages assume of a reader, made as the getting-started page makes it (its first block)."""
    folder = tmp_path_factory.mktemp("reader")
    _link_checkout(folder)
    first = blocks(GETTING_STARTED)[0]
    assert first.lang == "bash" and "my-model" in first.code, "getting-started's first block makes the files"
    _run(first, folder)
    tok_config = folder / "my-model" / "tokenizer_config.json"
    config = json.loads(tok_config.read_text())
    tok_config.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    chat = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows[:64]
    ]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return folder


def _link_checkout(folder: Path) -> None:
    for name in ("examples", "src"):
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)


def _run(block: Block, cwd: Path) -> None:
    if block.lang == "json":
        json.loads(block.code)
        return
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = (
        [sys.executable, "-c", block.code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", block.code]
    )
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (
        f"{block} ({block.lang}) failed:\n{block.code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    for expected in PRINTS.findall(block.code):
        assert expected in proc.stdout, f"{block}: the page says it prints {expected!r}; it printed:\n{proc.stdout}"


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=_page_id)
def test_page_code_blocks_run(page, reader_files, tmp_path):
    """The page's blocks, in order, in one folder: what a reader following the page runs."""
    if page == GETTING_STARTED:
        _link_checkout(tmp_path)
    else:
        shutil.copytree(reader_files, tmp_path, symlinks=True, dirs_exist_ok=True)
    ran = 0
    for block in blocks(page):
        if block.lang in RUN and not block.not_run:
            _run(block, tmp_path)
            ran += 1
    assert ran


def test_every_block_runs_or_says_why():
    assert len(ALL) > 20 and RUNNABLE_PAGES
    for block in ALL:
        if block.lang in {"sh", "shell", "console", "py", "yaml", "yml", "toml"}:
            pytest.fail(f"{block}: use ```bash / ```python / ```json (those run), not ```{block.lang}")
        if block.not_run is not None:
            assert block.lang in RUN and len(block.not_run) >= 10, f"{block}: say why it does not run"


def test_printed_outputs_are_checked():
    """The pages say what their blocks print (``# -> TEXT``), and the runner compares it."""
    said = [m for b in ALL if b.lang in RUN and not b.not_run for m in PRINTS.findall(b.code)]
    assert len(said) >= 6


def test_readme_is_two_screens_and_links_into_the_docs():
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024, f"README.md is {len(text.encode())} bytes"
    assert "pip install -e" in text and "dft train" in text and "python -m pytest -q tests" in text
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).exists(), link


def test_readme_headline_table_is_the_benchmarks():
    """The README's table is the committed benchmarks/results/trainer_step.md (rendered from its JSON)."""
    table = [line for line in (ROOT / "benchmarks/results/trainer_step.md").read_text().splitlines() if line[:1] == "|"]
    readme = README.read_text()
    assert len(table) >= 4 and all(line in readme for line in table)


def test_the_docs_tell_the_present():
    """History ("was N", "the first version", issue numbers) belongs in CHANGELOG.md only."""
    history = re.compile(
        r"the first version|an earlier (version|review)|\(was [0-9]|\bwas [0-9][0-9.,]*\b|used to be|\bissue [0-9]+|"
        r"\bbefore, |previous version|re-measured",
        flags=re.I,
    )
    for page in PAGES:
        if page.name == "changelog.md":
            continue
        for i, line in enumerate(page.read_text().splitlines(), 1):
            assert not history.search(line), f"{page.relative_to(ROOT)}:{i}: {line}"
