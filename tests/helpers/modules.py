"""Import a script (experiments/, benchmarks/) by file path, as the tests of those scripts do."""

import importlib.util
from pathlib import Path


def import_file(path: Path, name: str):
    """The module at ``path``, imported under ``name`` (not added to ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
