"""Every algorithm's ``build`` documents its paper (arXiv id) and each of its options."""

from __future__ import annotations

import inspect
import re

import pytest

from fedlora_jax.algorithms import BUILDERS

NO_PAPER = {"head_only"}  # a control arm, not a published method


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_build_docstring_names_its_paper_and_options(name):
    doc = inspect.getdoc(BUILDERS[name]) or ""
    assert doc, f"{name}.build has no docstring"
    if name not in NO_PAPER:
        assert re.search(r"arXiv \d{4}\.\d{4,5}", doc), f"{name}.build does not name its paper's arXiv id"
    options = [p.name for p in inspect.signature(BUILDERS[name]).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    missing = [o for o in options if f"``{o}``" not in doc and f"{o}:" not in doc and f"{o}," not in doc]
    assert not missing, f"{name}.build does not document its options {missing}"
    if not options:
        assert "Options" in doc, f"{name}.build should say that it has no options of its own"
