"""No folder or file of ours may shadow an installed package.

``python -m pytest`` / ``python -m fedlora_jax`` and an interactive ``python`` started in the
repository root put the root first on ``sys.path``; pytest's ``pythonpath`` setting puts
``tests/`` there too. A regular package (a folder with ``__init__.py``) or a module file in one of
those folders then wins over an installed package of the same name: our old top-level
``kernels/__init__.py`` broke transformers 5.25, which imports Hugging Face's ``kernels``. A folder
without ``__init__.py`` is only a namespace portion, which always loses to an installed package.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders our commands put on sys.path: the root (python -m, interactive python) and tests/
# (pyproject's [tool.pytest.ini_options] pythonpath).
PATH_FOLDERS = (ROOT, ROOT / "tests")
OURS = {"fedlora_jax"}


def importable_names(folder: Path) -> dict[str, str]:
    """``{name: kind}`` of what ``import name`` finds in ``folder``: 'package' (a folder with
    ``__init__.py``), 'module' (``name.py``) or 'namespace' (any other folder with a valid name)."""
    found = {}
    for p in folder.iterdir():
        if p.name.startswith((".", "_")) or not p.stem.isidentifier():
            continue
        if p.is_dir() and p.stem == p.name:
            found[p.name] = "package" if (p / "__init__.py").is_file() else "namespace"
        elif p.is_file() and p.suffix == ".py":
            found[p.stem] = "module"
    return found


def installed_top_level_names() -> set[str]:
    """Every top-level import name an installed distribution provides (except ours)."""
    return {name for name, dists in importlib.metadata.packages_distributions().items()
            if "fedlora_jax" not in dists and "fedlora-jax" not in dists}


def shadowing(folder: Path, installed: set[str]) -> list[str]:
    """Names in ``folder`` that are a regular package or a module and that an installed
    distribution also provides (a namespace folder cannot shadow: it loses to them)."""
    return sorted(f"{folder.name}/{name} ({kind})" for name, kind in importable_names(folder).items()
                  if kind != "namespace" and name in installed and name not in OURS)


def test_importable_names_sees_kinds(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "ns").mkdir()
    (tmp_path / "mod.py").write_text("")
    (tmp_path / "README.md").write_text("")
    (tmp_path / "not-a-name").mkdir()
    assert importable_names(tmp_path) == {"pkg": "package", "ns": "namespace", "mod": "module"}
    # The check fails where a package or module of ours carries an installed name.
    assert shadowing(tmp_path, {"pkg", "ns", "mod", "other"}) == [f"{tmp_path.name}/mod (module)",
                                                                  f"{tmp_path.name}/pkg (package)"]


@pytest.mark.parametrize("folder", PATH_FOLDERS, ids=lambda p: p.name)
def test_no_folder_of_ours_shadows_an_installed_package(folder):
    assert not shadowing(folder, installed_top_level_names()), (
        "these would shadow installed packages from a command run in the repository root; move their files "
        "into a subfolder (as kernels/src/) or rename them")


def test_top_level_kernels_is_not_a_package():
    # The design card asks for a top-level kernels/ folder: its Python files live in kernels/src/
    # (installed as fedlora_jax.kernels), so `import kernels` from the root never finds ours.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "src" / "__init__.py").is_file()


def test_python_dash_m_in_the_root_imports_installed_kernels(tmp_path):
    """End to end: with the root first on sys.path (as `python -m` puts it), `import kernels`
    finds an installed regular package of that name, not our folder. A fake one, placed on sys.path
    after the root, stands in for Hugging Face's, so the test does not depend on it being installed."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}, {str(tmp_path / 'site')!r}]; "
            "from kernels import CUDAProperties; print(CUDAProperties)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "installed"


def test_fedlora_jax_kernels_still_imports():
    from fedlora_jax.kernels import lora_linear  # noqa: F401
    from fedlora_jax.kernels.lora_matmul import fused_lora_linear_reference  # noqa: F401
