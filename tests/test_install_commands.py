"""The README's two set-up commands, `.ci/run` and the lock file agree with each other and with
pyproject.toml (a drift between them is what broke CI on transformers 5.25)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()
EXTRAS_TESTED = ("test", "interop", "flower", "tpu-plan")   # what command 2 and .ci/run install


def setup_command(n: int) -> str:
    """The one-line bash block under the README's '**n. Install and run ...**' heading."""
    m = re.search(rf"\*\*{n}\. Install and run[^\n]*\n(?:[^\n]*\n)*?```bash\n([^\n]+)\n```", README)
    assert m, f"README.md: no set-up command {n}"
    return m.group(1)


def constraints(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``{canonical name: pinned version}`` of the lock file; every line is ``name==version``."""
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS_TESTED:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_ci_runs_the_readme_test_command():
    assert setup_command(2) in CI_RUN


def test_both_commands_install_through_the_lock():
    for n in (1, 2):
        assert "pip install -q -c constraints.txt -e " in setup_command(n), f"command {n}"


def test_lock_pins_every_requirement_within_its_range():
    pins = constraints()
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject.toml: {req})"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}")


def test_constraints_parser_refuses_a_range(tmp_path):
    (tmp_path / "c.txt").write_text("# header\njax==0.10.2\n\nTyping_Extensions==4.16.0\n")
    assert constraints(tmp_path / "c.txt") == {"jax": "0.10.2", "typing-extensions": "4.16.0"}
    (tmp_path / "c.txt").write_text("jax>=0.10\n")
    with pytest.raises(AssertionError, match="is not name==version"):
        constraints(tmp_path / "c.txt")
