"""The documentation runs: every ```python block of README.md and docs/*.md is executed, and every
command of their ```bash blocks is run or accounted for.

Conventions (see ``parse_markdown``):

- the blocks of one file run in order in one shared namespace, so a later block can use the names
  an earlier one defined; the docs define what they use (a small model in the first block), there
  is no hidden setup;
- a block that cannot run on a CPU machine (it needs a GPU, or it is illustrative pseudo-code) is
  marked on the line before its fence with ``<!-- docs-test: skip (the reason) -->``; the reason
  is required, and skipped blocks are reported one by one with it (``pytest -rs``);
- a ```python block that is a file the commands use (the model module the command line plans) is
  marked ``<!-- docs-test: file NAME.py -->``: it runs like any other block and is also written,
  as NAME.py, to the folder the commands run in;
- the ```bash blocks' commands (continuation lines joined, ``&&`` chains split, comments dropped)
  run in that folder: ``sac-compiler ...`` and ``python -m sac_compiler ...`` in a subprocess,
  each must exit 0 and write the files its ``--json`` and picture flags name. The commands that
  install the package or run this suite (``NOT_RUN``) cannot run inside it: they must be what
  ``.ci/run`` runs. Any other command is a failure until this file knows how to run it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# commands the docs give that no test can run from inside the suite, and why; .ci/run must run each
NOT_RUN = {
    ("pip", "install", "-e", ".[test]"): "installs the package into the environment the tests run in",
    ("python", "-m", "pytest", "-q"): "runs this test suite",
}
# the command line's flags that name a file it writes, and what the file is
OUTPUT_FLAGS = {"--json": "json", "--plot": "png", "--timeline-plot": "png", "--tradeoff-plot": "png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER = re.compile(r"<!--\s*docs-test\b(?P<body>.*?)-->", re.DOTALL)
_SKIP = re.compile(r"^:\s*skip\s*\((?P<reason>.*)\)\s*$", re.DOTALL)
_FILE = re.compile(r"^:\s*file\s+(?P<name>[A-Za-z_][A-Za-z0-9_]*\.py)\s*$")


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
    file_name: str | None = None  # written as this file to the folder the commands run in

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def parse_markdown(text: str, path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``text`` and the problems found (a skip without a reason, a marker that
    marks no block or cannot be read, a fence left open); never raises, so collection never fails."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str | None, str | None] | None = None  # (line, skip reason, file) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            marker = _MARKER.search(line)
            if marker is not None:
                if pending is not None:
                    problems.append(f"{path.name}:{pending[0]}: docs-test marker not followed by a fence")
                pending = (i + 1, *_marker(marker.group("body"), path.name, i + 1, problems))
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
        reason = file_name = None
        if pending is not None:
            marker_line, reason, file_name = pending
            pending = None
            if lang not in PYTHON_LANGS:
                problems.append(f"{path.name}:{marker_line}: docs-test marker on a ```{lang} block; only ```python "
                                "blocks take one")
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", reason, file_name))
        i += 1
    if pending is not None:
        problems.append(f"{path.name}:{pending[0]}: docs-test marker not followed by a fence")
    return blocks, problems


def _marker(body: str, name: str, line: int, problems: list[str]) -> tuple[str | None, str | None]:
    """(skip reason, file name) of a marker's body; a problem, and neither, when it cannot be read."""
    file = _FILE.match(body.strip())
    if file is not None:
        return None, file.group("name")
    skip = _SKIP.match(body.strip())
    if skip is None:
        problems.append(f"{name}:{line}: cannot read docs-test marker {body.strip()!r}; "
                        "write <!-- docs-test: skip (the reason) --> or <!-- docs-test: file NAME.py -->")
        return None, None
    reason = skip.group("reason").strip()
    if not reason:
        problems.append(f"{name}:{line}: a docs-test skip needs a reason: <!-- docs-test: skip (the reason) -->")
        return None, None
    return reason, None


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
def test_python_blocks_run(path: Path, tmp_path: Path) -> None:
    """Every ```python block of the file runs, in order, in one namespace."""
    blocks, problems = _parse(path)
    assert not problems, "\n".join(problems)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    for block in blocks:
        if block.lang not in PYTHON_LANGS or block.skip_reason is not None:
            continue
        # pad so that line numbers in a traceback are the markdown file's own; the source is a
        # Python file of its own (Dynamo reads the file a traced function comes from as Python)
        source = tmp_path / f"{path.stem}_line{block.line}.py"
        source.write_text("\n" * block.line + block.source)
        code = compile(source.read_text(), str(source), "exec")
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


# -- the commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command of a shell block: where it starts (file:line), and its words."""

    where: str
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def shell_commands(block: Block) -> list[Command]:
    """The commands of a shell block: continuation lines joined, ``#`` comments dropped, ``&&``
    chains split into their commands."""
    lines: list[tuple[int, str]] = []  # (the markdown line it starts on, the joined line)
    current, start = "", None
    for number, line in enumerate(block.source.splitlines(), start=block.line + 1):
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append((start, current + line))
        current, start = "", None
    if start is not None:
        lines.append((start, current))
    where = block.where.rsplit(":", 1)[0]
    commands = []
    for number, line in lines:
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                words.append(word)
            elif words:
                commands.append(Command(f"{where}:{number}", tuple(words)))
                words = []
    return commands


def _commands() -> list[Command]:
    return [c for path in doc_files() for b in _parse(path)[0] if b.lang in SHELL_LANGS for c in shell_commands(b)]


def _normalized(argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A command as .ci/run and the docs may both write it: ``python -m pip`` as ``pip``, no ``-q``."""
    words = [w for w in argv if w != "-q"]
    if words[:3] == ["python", "-m", "pip"]:
        words = words[2:]
    return tuple(words)


def _sac_argv(argv: tuple[str, ...]) -> list[str] | None:
    """The subprocess that runs a command of the command line, or None for another command.
    ``sac-compiler`` is the console script of ``sac_compiler.__main__:main``, which ``python -m
    sac_compiler`` runs (``test_the_console_script_is_the_module``)."""
    if argv[0] == "sac-compiler":
        return [sys.executable, "-m", "sac_compiler", *argv[1:]]
    if argv[:3] == ("python", "-m", "sac_compiler"):
        return [sys.executable, *argv[1:]]
    return None


def _outputs(argv: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(flag, path, kind) of every file the command's flags say it writes."""
    out = []
    for i, word in enumerate(argv):
        flag, _, value = word.partition("=")
        if flag in OUTPUT_FLAGS:
            out.append((flag, value or argv[i + 1], OUTPUT_FLAGS[flag]))
    return out


def _run_params() -> list:
    seen: set[tuple[str, ...]] = set()
    params = []
    for command in _commands():
        if _sac_argv(command.argv) is not None and command.argv not in seen:
            seen.add(command.argv)
            params.append(pytest.param(command, id=f"{command.where} {' '.join(command.argv[:2])}"))
    return params


@pytest.fixture(scope="module")
def commands_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the docs' commands run in, holding the files the docs give (``docs-test: file``)."""
    folder = tmp_path_factory.mktemp("docs-commands")
    written: dict[str, str] = {}
    for path in doc_files():
        for block in _python_blocks(path):
            if block.file_name is None:
                continue
            assert block.file_name not in written, f"{block.where} and {written[block.file_name]} both give " \
                                                   f"{block.file_name}"
            written[block.file_name] = block.where
            (folder / block.file_name).write_text(block.source)
    return folder


@pytest.mark.parametrize("command", _run_params())
def test_commands_run(command: Command, commands_dir: Path) -> None:
    """Each command of the command line the docs give runs, exits 0 and writes the files it names."""
    outputs = _outputs(command.argv)
    if any(kind == "png" for _, _, kind in outputs) and find_spec("matplotlib") is None:
        pytest.skip(f"{command.where}: `{command.text}` draws pictures, and matplotlib is not installed "
                    "(pip install 'sac-compiler[plot]'; the test extra has it)")
    for _, name, _ in outputs:
        (commands_dir / name).unlink(missing_ok=True)  # written by this command, not an earlier one
    env = {k: v for k, v in os.environ.items() if k != "SAC_LOG"}
    env["OMP_NUM_THREADS"] = "1"
    argv = _sac_argv(command.argv)
    assert argv is not None
    proc = subprocess.run(argv, cwd=commands_dir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{command.where}: `{command.text}` exited {proc.returncode}:\n{proc.stderr}"
    assert proc.stdout.strip(), f"{command.where}: `{command.text}` printed nothing"
    for flag, name, kind in outputs:
        written = commands_dir / name
        assert written.is_file(), f"{command.where}: `{command.text}` wrote no {name} ({flag})"
        if kind == "json":
            assert isinstance(json.loads(written.read_text()), dict), name
        else:
            assert written.read_bytes()[:8] == PNG_SIGNATURE, f"{name} ({flag}) is not a PNG"


def test_commands_not_run_here_are_run_by_ci() -> None:
    """The docs' other commands are the ones the suite cannot run (``NOT_RUN``), and .ci/run runs them."""
    ci = set()
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words:
            ci.add(_normalized(words))
    not_run = {_normalized(list(key)) for key in NOT_RUN}
    others = [c for c in _commands() if _sac_argv(c.argv) is None]
    assert others, "the docs give no install or test command"
    for command in others:
        assert _normalized(command.argv) in not_run, (
            f"{command.where}: no test runs `{command.text}`; run it in tests/test_docs.py or list it in NOT_RUN")
        assert _normalized(command.argv) in ci, f"{command.where}: .ci/run does not run `{command.text}`"


def test_the_console_script_is_the_module() -> None:
    """``sac-compiler`` and ``python -m sac_compiler`` run the same function."""
    import sac_compiler.__main__
    from sac_compiler.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "sac-compiler"]
    assert script.load() is main is sac_compiler.__main__.main


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


def test_parser_reads_file_markers_and_shell_commands() -> None:
    text = ("<!-- docs-test: file my_models.py -->\n```python\nx = 1\n```\n\n```bash\n"
            "pip install -e \".[test]\" && python -m sac_compiler  # the demo\n"
            "sac-compiler plan m:f --inputs \"long[2]\" \\\n    --json out.json --plot=p.png\n```\n")
    blocks, problems = parse_markdown(text, Path("sample.md"))
    assert problems == []
    assert (blocks[0].file_name, blocks[0].skip_reason) == ("my_models.py", None)
    assert [c.where.rsplit(":", 1)[1] for c in shell_commands(blocks[1])] == ["7", "7", "8"]
    commands = [c.argv for c in shell_commands(blocks[1])]
    assert commands == [("pip", "install", "-e", ".[test]"), ("python", "-m", "sac_compiler"),
                        ("sac-compiler", "plan", "m:f", "--inputs", "long[2]", "--json", "out.json", "--plot=p.png")]
    assert _outputs(commands[2]) == [("--json", "out.json", "json"), ("--plot", "p.png", "png")]
    assert _sac_argv(commands[0]) is None and _sac_argv(commands[1]) == [sys.executable, "-m", "sac_compiler"]
    assert _normalized(["python", "-m", "pip", "install", "-q", "-e", ".[test]"]) == commands[0]


@pytest.mark.parametrize("text", [
    "<!-- docs-test: file my_models.py -->\n```bash\nls\n```\n",
    "<!-- docs-test: file models.txt -->\n```python\nx = 1\n```\n",
], ids=["on-a-bash-block", "not-a-py-file"])
def test_parser_refuses_bad_file_markers(text: str) -> None:
    _, problems = parse_markdown(text, Path("sample.md"))
    assert len(problems) == 1 and "sample.md:1" in problems[0], problems
