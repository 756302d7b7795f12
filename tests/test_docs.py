"""The documentation runs: every ```python block of README.md and docs/*.md is executed.

Conventions (see ``parse_markdown``):

- the blocks of one file run in order in one shared namespace, so a later block can use the names
  an earlier one defined; the docs define what they use (a small model in the first block), there
  is no hidden setup;
- a block that cannot run on a CPU machine (it needs a GPU, or it is illustrative pseudo-code) is
  marked on the line before its fence with ``<!-- docs-test: skip (the reason) -->``; the reason
  is required, and skipped blocks are reported one by one with it (``pytest -rs``);
- other fences (```bash, ```text, ...) are not run; the commands README gives are checked to be
  there.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_LANGS = {"python", "py", "python3"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER = re.compile(r"<!--\s*docs-test\b(?P<body>.*?)-->", re.DOTALL)
_SKIP = re.compile(r"^:\s*skip\s*\((?P<reason>.*)\)\s*$", re.DOTALL)


def doc_files() -> list[Path]:
    """README.md and every docs/*.md: a new page is covered without touching this file."""
    return sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    skip_reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def parse_markdown(text: str, path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``text`` and the problems found (a skip without a reason, a marker that
    marks no block or cannot be read, a fence left open); never raises, so collection never fails."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str | None] | None = None  # (line, skip reason) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            marker = _MARKER.search(line)
            if marker is not None:
                if pending is not None:
                    problems.append(f"{path.name}:{pending[0]}: docs-test marker not followed by a fence")
                pending = (i + 1, _skip_reason(marker.group("body"), path.name, i + 1, problems))
            elif line.strip() and pending is not None:
                problems.append(f"{path.name}:{pending[0]}: docs-test marker must be on the line before a fence")
                pending = None
            i += 1
            continue
        start, indent, mark = i, fence.group("indent"), fence.group("fence")
        lang = fence.group("info").split()[0].lower() if fence.group("info").strip() else ""
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close.group("fence").startswith(mark[0] * len(mark)) and not close.group("info"):
                break
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        else:
            problems.append(f"{path.name}:{start + 1}: fence never closed")
        reason = None
        if pending is not None:
            marker_line, reason = pending
            pending = None
            if lang not in PYTHON_LANGS:
                problems.append(f"{path.name}:{marker_line}: docs-test marker on a ```{lang} block, which is not run")
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", reason))
        i += 1
    if pending is not None:
        problems.append(f"{path.name}:{pending[0]}: docs-test marker not followed by a fence")
    return blocks, problems


def _skip_reason(body: str, name: str, line: int, problems: list[str]) -> str | None:
    skip = _SKIP.match(body.strip())
    if skip is None:
        problems.append(f"{name}:{line}: cannot read docs-test marker {body.strip()!r}; "
                        "write <!-- docs-test: skip (the reason) -->")
        return None
    reason = skip.group("reason").strip()
    if not reason:
        problems.append(f"{name}:{line}: a docs-test skip needs a reason: <!-- docs-test: skip (the reason) -->")
        return None
    return reason


def _parse(path: Path) -> tuple[list[Block], list[str]]:
    return parse_markdown(path.read_text(encoding="utf-8"), path)


def _python_blocks(path: Path) -> list[Block]:
    return [b for b in _parse(path)[0] if b.lang in PYTHON_LANGS]


def _skipped() -> list:
    params = [pytest.param(b, id=f"{b.path.name}:{b.line}")
              for path in doc_files() for b in _python_blocks(path) if b.skip_reason is not None]
    return params or [pytest.param(None, id="none")]


# -- the docs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_python_blocks_run(path: Path) -> None:
    """Every ```python block of the file runs, in order, in one namespace."""
    blocks, problems = _parse(path)
    assert not problems, "\n".join(problems)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    for block in blocks:
        if block.lang not in PYTHON_LANGS or block.skip_reason is not None:
            continue
        # pad so that line numbers in a traceback are the markdown file's own
        code = compile("\n" * block.line + block.source, str(path), "exec")
        failure = None
        try:
            exec(code, namespace)
        except Exception:  # noqa: BLE001 - any failure of a block is the test's failure
            failure = traceback.format_exc()
        if failure is not None:
            pytest.fail(f"the ```python block at {block.where} failed:\n{failure}", pytrace=False)


@pytest.mark.parametrize("block", _skipped())
def test_skipped_blocks_have_reasons(block: Block | None) -> None:
    """Each block the docs mark as not run is reported as skipped, with its reason."""
    if block is None:
        return  # no block is skipped
    pytest.skip(f"{block.where}: {block.skip_reason}")


def test_readme_gives_the_commands() -> None:
    """The two commands of README's "Two commands" are there, in ```bash blocks."""
    readme = ROOT / "README.md"
    commands = [line.strip() for b in _parse(readme)[0] if b.lang in {"bash", "sh", "shell", "console"}
                for line in b.source.splitlines()]
    for command in ('pip install -e ".[test]" && python -m sac_compiler', "python -m pytest -q"):
        assert command in commands, f"README.md gives no ```bash block with {command!r}; it has {commands}"


# -- the parser itself ----------------------------------------------------------------------------


_SAMPLE = """\
# Title

```python
a = 1
```

<!-- docs-test: skip (needs a CUDA GPU) -->
```python
torch.cuda.synchronize()
```

```bash
echo not run
```

- indented:

  ```py
  b = a + 1
  ```
"""


def test_parser_finds_blocks_and_skip_reasons() -> None:
    blocks, problems = parse_markdown(_SAMPLE, Path("sample.md"))
    assert problems == []
    assert [(b.line, b.lang, b.skip_reason) for b in blocks] == [
        (3, "python", None), (8, "python", "needs a CUDA GPU"), (12, "bash", None), (18, "py", None)]
    assert blocks[0].source == "a = 1\n" and blocks[3].source == "b = a + 1\n"


@pytest.mark.parametrize("marker", [
    "<!-- docs-test: skip -->",
    "<!-- docs-test: skip () -->",
    "<!-- docs-test: skip (   ) -->",
    "<!-- docs-test: skpi (typo) -->",
])
def test_parser_refuses_a_skip_without_reason(marker: str) -> None:
    blocks, problems = parse_markdown(f"{marker}\n```python\nx = 1\n```\n", Path("sample.md"))
    assert len(problems) == 1 and "sample.md:1" in problems[0], problems
    assert blocks[0].skip_reason is None  # so the block runs, and the file's test fails on the problem


def test_parser_refuses_stray_markers_and_open_fences() -> None:
    text = "<!-- docs-test: skip (gpu) -->\ntext between\n```python\nx = 1\n```\n```python\ny = 2\n"
    _, problems = parse_markdown(text, Path("sample.md"))
    assert any("line before a fence" in p for p in problems), problems
    assert any("fence never closed" in p for p in problems), problems
