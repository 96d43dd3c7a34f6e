"""Every ```python block of README.md runs as written and prints what its ``# ->`` comments say;
the examples in ``experiments/examples/`` run (as subprocesses: one of them turns on x64)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "experiments" / "examples"


def readme_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first code line number, language, code)`` of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for no, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1) or "text", no + 1, []
        elif fence:
            blocks.append((start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: unterminated code block starting at line {start - 1}"
    return blocks


# Blocks whose first line is "# readme-test: <tag> ..." need a trained run; the test named there runs them.
PY_BLOCKS = [b for b in readme_blocks(README.read_text()) if b[1] == "python" and not b[2].startswith("# readme-test:")]


def test_readme_block_parser_sees_python_and_bash():
    langs = [lang for _, lang, _ in readme_blocks(README.read_text())]
    assert "python" in langs and "bash" in langs
    assert readme_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n") == [(3, "python", "x = 1\n"),
                                                                            (6, "bash", "ls\n")]


@pytest.mark.parametrize("line, code", [(no, code) for no, _, code in PY_BLOCKS],
                         ids=[f"README.md:{no}" for no, _, _ in PY_BLOCKS])
def test_readme_python_block_runs(line, code):
    out = io.StringIO()
    try:
        compiled = compile("\n" * (line - 1) + code, str(README), "exec")   # tracebacks give README lines
        with contextlib.redirect_stdout(out):
            exec(compiled, {"__name__": "__readme__"})           # fresh namespace, block alone
    except Exception:
        pytest.fail(f"README.md python block at line {line} failed:\n{traceback.format_exc()}\n"
                    f"stdout so far:\n{out.getvalue()}")
    # each `print(...)  # -> X` line must have printed exactly X, in order (line numbers name the README line)
    expected = [(line + i, m.group(1).strip()) for i, src in enumerate(code.splitlines())
                if "print(" in src and (m := re.search(r"#\s*->\s*(.*)$", src))]
    printed = out.getvalue().splitlines()
    assert len(printed) >= len(expected), f"block at README.md:{line} printed {printed}, expected {expected}"
    it = iter(printed)
    for no, want in expected:
        got = next(it)
        assert got.strip() == want, f"README.md:{no}: printed {got!r}, the comment says {want!r}"


EXAMPLE_OUTPUT = {
    "lora_in_your_nnx_model.py": ["loss after one SGD step", "singular values, client 0"],
    "grad_through_aggregation.py": ["replication_padding: val loss", "central FD", "fedit: val loss"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTPUT))
def test_example_runs(name):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    for needle in EXAMPLE_OUTPUT[name]:
        assert needle in proc.stdout, f"{name} did not print {needle!r}:\n{proc.stdout}"


def test_readme_names_the_examples():
    text = README.read_text()
    for name in EXAMPLE_OUTPUT:
        assert (EXAMPLES / name).is_file()
        assert f"python experiments/examples/{name}" in text


def test_readme_tagged_blocks_are_run_by_their_test():
    """A block tagged ``# readme-test: <tag> (... by tests/<file>.py)`` is skipped above: its file runs it."""
    tagged = [code.splitlines()[0] for _, lang, code in readme_blocks(README.read_text())
              if lang == "python" and code.startswith("# readme-test:")]
    for first in tagged:
        m = re.match(r"# readme-test: (\S+) .*\b(tests/\S+\.py)", first)
        assert m, f"README.md: tagged block {first!r} must name its tag and its test file"
        assert f'"{m.group(1)}"' in (ROOT / m.group(2)).read_text(), f"{m.group(2)} does not run {m.group(1)!r}"
