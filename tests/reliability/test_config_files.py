"""``fedlora train --config X`` with an X that is not a usable config (issue 18): one line on
stderr naming the file and what was expected, exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_jax.cli import main
from fedlora_jax.driver.config import ConfigFileError, ExperimentConfig, load_config

EXPECTED = "expected a .py file defining get_config(variant) -> ExperimentConfig"

# (file name, contents, fragments the one-line message must hold besides the file's path)
CASES = {
    "text_file": ("exp.txt", "rounds = 3\n", ["is not a .py or .json file", EXPECTED]),
    "yaml_file": ("exp.yaml", "rounds: 3\n", ["is not a .py or .json file", EXPECTED]),
    "no_get_config": ("exp.py", "ROUNDS = 3\n", ["defines no get_config(variant)", EXPECTED]),
    "get_config_not_callable": ("exp.py", "get_config = 3\n", ["get_config is not a function (got int)", EXPECTED]),
    "syntax_error": ("exp.py", "def get_config(variant):\n    return (\n",
                     ["is not valid Python (SyntaxError at line 2:", EXPECTED]),
    "null_bytes": ("exp.py", "x = 1\0\n", ["is not valid Python", EXPECTED]),
    "import_raises": ("exp.py", "import os\nx = 1 / 0\n",
                      ["failed to import at line 2: ZeroDivisionError: division by zero"]),
    "imports_missing_module": ("exp.py", "import no_such_module_for_fedlora_tests\n",
                               ["failed to import at line 1: ModuleNotFoundError", "no_such_module_for_fedlora_tests"]),
    "get_config_raises": ("exp.py", "def get_config(variant):\n    raise RuntimeError('no data\\nfor you')\n",
                          ["get_config('full') failed at line 2: RuntimeError: no data for you"]),
    "get_config_without_variant": ("exp.py", "def get_config():\n    pass\n",
                                   ["get_config('full') failed: TypeError", "positional argument"]),
    "get_config_invalid_field": ("exp.py", "from fedlora_jax.driver.config import ExperimentConfig\n\n"
                                 "def get_config(variant):\n    return ExperimentConfig(rounds=0)\n",
                                 ["get_config('full') failed at line 4: ValueError: config field 'rounds' = 0"]),
    "get_config_returns_dict": ("exp.py", "def get_config(variant='full'):\n    return {'rounds': 3}\n",
                                ["get_config('full') returned a dict, expected an ExperimentConfig"]),
    "json_syntax_error": ("exp.json", '{"rounds": 3,', ["is not valid JSON (JSONDecodeError:", EXPECTED]),
    "json_not_an_object": ("exp.json", "[1, 2]", ["holds a JSON list", EXPECTED]),
    "json_unknown_key": ("exp.json", '{"roundz": 3}', ["unknown config key 'roundz'", "did you mean 'rounds'"]),
    "json_bad_value": ("exp.json", '{"target_modules": 5}', ["config field 'target_modules' = 5 is invalid: expected a list"]),
}


def _assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    for frag in fragments:
        assert frag in err, f"{frag!r} not in {err!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_file_is_a_one_line_cli_error(case, tmp_path, capsys):
    name, text, fragments = CASES[case]
    path = tmp_path / name
    path.write_text(text)
    rc = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, f"error: config file {str(path)!r}", *fragments)
    assert captured.out == ""
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched
    with pytest.raises(ConfigFileError):  # a ValueError: library callers catch it as before
        load_config(path)


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_config_path_that_is_not_a_file(what, tmp_path, capsys):
    path = tmp_path / "exp.py"
    if what == "directory":
        path.mkdir()
    rc = main(["train", "--config", str(path)])
    frag = "does not exist" if what == "missing" else f"is not a file; {EXPECTED}"
    _assert_one_line_error(rc, capsys.readouterr().err, f"error: config file {str(path)!r}", frag)


def test_unknown_variant_names_the_config_file(tmp_path, capsys):
    path = tmp_path / "exp.py"
    path.write_text("from fedlora_jax.driver.config import ExperimentConfig, select_variant\n\n"
                    "def get_config(variant='full'):\n    return select_variant(ExperimentConfig(), variant)\n")
    rc = main(["train", "--config", str(path), "--variant", "huge"])
    _assert_one_line_error(rc, capsys.readouterr().err, str(path), "get_config('huge') failed",
                           "variant must be 'full' or 'smoke', got 'huge'")


def test_good_config_files_still_load(tmp_path):
    py = tmp_path / "exp.py"
    py.write_text("from fedlora_jax.driver.config import ExperimentConfig\n\n"
                  "def get_config(variant='full'):\n    return ExperimentConfig(name=variant, rounds=3)\n")
    assert load_config(py, variant="smoke", overrides=["lr=0.01"]) == ExperimentConfig(name="smoke", rounds=3, lr=0.01)
    js = tmp_path / "exp.json"
    js.write_text('{"rounds": 3, "target_modules": ["query"]}')
    assert load_config(js) == ExperimentConfig(rounds=3, target_modules=("query",))


def test_bad_config_through_the_real_entry_point(tmp_path):
    """``python -m fedlora_jax``: nothing from importlib reaches the terminal."""
    path = tmp_path / "exp.py"
    path.write_text("def get_config(variant):\n    return (\n")
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax", "train", "--config", str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          cwd=Path(__file__).resolve().parents[2])
    _assert_one_line_error(proc.returncode, proc.stderr, f"error: config file {str(path)!r} is not valid Python")
    assert proc.stdout == ""
