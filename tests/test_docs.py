"""Every code block of README.md and docs/*.md runs as written.

The convention (see the brief in BRIEF.md and the README's "Docs" note):

* ```python blocks of one file run in order in one fresh interpreter (one
  script made of them), with the tree on PYTHONPATH and a time limit.  A block
  that contains ``if __name__ == "__main__":`` is a program of its own (spawn
  and forkserver children re-import ``__main__``): it runs alone, as a script
  file, so that its children do not re-run the file's other blocks -- once as
  written and once with the spawn start method.
* ```bash / ```sh / ```console blocks: each line that is a ``shmq ...`` or
  ``python -m shmq ...`` command runs (as ``python -m shmq ...`` with this
  tree; the installed ``shmq`` script may point elsewhere) and must exit 0.
  Other lines (pip, pytest, scripts) are not run.
* A block whose fence has the line ``<!-- no-run -->`` directly above it (blank
  lines aside) is skipped: for commands that never end (``shmq top``), need a
  name (``shmq stat NAME``) or take minutes (``shmq bench``).
* The README's first block is exactly the install+demo and install+test
  commands.

One test per doc file, so a new file under docs/ is picked up without
touching this one.  Children inherit SHMQ_NAME_TAG, so whatever a block leaves
in /dev/shm fails the session (conftest.py).
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
from typing import List, NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NO_RUN = "<!-- no-run -->"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT = 90.0  # seconds for one script or one command
SPAWN_FIRST = 'import multiprocessing as _mp; _mp.set_start_method("spawn", force=True)\n'
README_COMMANDS = [
    "pip install -e . && python -m shmq demo",
    "pip install -e '.[test]' && python -m pytest -q",
]


class Block(NamedTuple):
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    run: bool


def blocks(path: pathlib.Path) -> List[Block]:
    """The fenced code blocks of ``path``, in order."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    previous = ""  # the last non-blank line before the current one
    while i < len(lines):
        m = re.match(r"^(\s*)```+\s*([\w+-]*)", lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        out.append(Block(lang, "\n".join(body) + "\n", start + 1, previous != NO_RUN))
        previous = ""
        i += 1
    return out


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("SHMQ_DEBUG", None)
    return e


def is_program(code: str) -> bool:
    return re.search(r"^if __name__ == ['\"]__main__['\"]:", code, re.M) is not None


def run(argv: List[str], cwd: pathlib.Path, what: str) -> subprocess.CompletedProcess:
    """Run ``argv`` in a session of its own; on timeout kill the whole group
    (a command's own children too) and fail."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what}: did not end in {BLOCK_TIMEOUT:.0f} s (if it never ends, mark its block {NO_RUN})")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_script(code: str, where: str, tmp_path: pathlib.Path, label: str) -> None:
    script = tmp_path / f"{label}.py"
    script.write_text(code, encoding="utf-8")
    res = run([sys.executable, str(script)], tmp_path, where)
    assert res.returncode == 0, f"{where}: exit status {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


def shmq_commands(code: str) -> List[List[str]]:
    """The ``shmq ...`` / ``python -m shmq ...`` lines of a shell block, as
    argv lists run through this interpreter."""
    out = []
    for raw in code.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "shmq":
            args = words[1:]
        elif words[:3] == ["python", "-m", "shmq"]:
            args = words[3:]
        else:
            continue
        if any(w in ("&&", "||", "|", ";", ">", "<") for w in args):
            raise AssertionError(f"a shmq command joined with others cannot be run by the doc test: {line!r}")
        out.append([sys.executable, "-m", "shmq", *args])
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_code_blocks_run(path, tmp_path):
    rel = path.relative_to(ROOT)
    found = blocks(path)
    ran = 0
    together: List[str] = []
    for n, b in enumerate(found):
        if not b.run:
            continue
        where = f"{rel}:{b.line}"
        if b.lang in ("python", "py"):
            if is_program(b.code):
                run_script(b.code, where, tmp_path, f"block{n}")
                # and under spawn, the start method that re-imports __main__
                # (the default on macOS; forkserver, 3.14's default on Linux, does too)
                run_script(SPAWN_FIRST + b.code, f"{where} (spawn)", tmp_path, f"block{n}_spawn")
            else:
                together.append(f"# --- {where}\n{b.code}")
            ran += 1
        elif b.lang in SHELL_LANGS:
            for argv in shmq_commands(b.code):
                command = "shmq " + shlex.join(argv[3:])
                res = run(argv, tmp_path, f"{where}: {command}")
                assert res.returncode == 0, f"{where}: {command} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
                ran += 1
    if together:
        run_script("".join(together), f"{rel} (its blocks in order)", tmp_path, "blocks")
    if not ran:
        pytest.skip(f"{rel} has no block to run")


def test_readme_starts_with_the_install_commands():
    first = blocks(ROOT / "README.md")[0]
    assert first.lang in SHELL_LANGS
    commands = [shlex.split(line, comments=True) for line in first.code.splitlines() if line.strip()]
    assert commands == [shlex.split(c) for c in README_COMMANDS]


def test_no_run_marks_only_skip_the_block_below(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "<!-- no-run -->\n\n```python\nraise SystemExit(3)\n```\n\ntext\n\n```python\nx = 1\n```\n"
        "```bash\nshmq ls --json   # a comment\npip install x\n```\n"
    )
    b = blocks(doc)
    assert [(x.lang, x.run) for x in b] == [("python", False), ("python", True), ("bash", True)]
    assert [a[3:] for a in shmq_commands(b[2].code)] == [["ls", "--json"]]
