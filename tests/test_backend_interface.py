"""One interface for every model family: the registry names families, nothing else does.

The package is read as source: no `hasattr`/`getattr` on a backend (its optional parts are declared
by backends/base.py), and no family key as a string literal outside backends/registry.py and the
fixture maker tiny_models.py. Each registry row's backend implements the whole interface.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from difflora_kit.backends import base, registry

PACKAGE = Path(__file__).resolve().parents[1] / "difflora_kit"
# besides the registry and the fixture maker: the models of other programs' per-family key handling
# (DiffSynth-Studio's names, each loader's rules), whose families are those programs' own
ALLOWED_TO_NAME_FAMILIES = {PACKAGE / "backends" / "registry.py", PACKAGE / "tiny_models.py",
                            PACKAGE / "diffsynth.py", PACKAGE / "loader_rules.py"}
BACKEND_NAMES = ("backend", "kit", "self.backend")


def package_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_the_registry_names_every_family_once():
    keys = [row.key for row in registry.FAMILIES]
    pipelines = [p for row in registry.FAMILIES for p in row.pipelines]
    assert len(set(keys)) == len(keys) and len(set(pipelines)) == len(pipelines)
    for row in registry.FAMILIES:
        assert registry.get(row.key) is row and all(registry.by_pipeline(p) is row for p in row.pipelines)


def test_no_family_key_is_spelled_outside_the_registry():
    """A quoted family key ("sdxl", 'flux') anywhere in the package's source but the registry and the
    fixture maker: in code, docstrings or comments."""
    quoted = re.compile(r"[\"'](%s)[\"']" % "|".join(re.escape(row.key) for row in registry.FAMILIES))
    found = [f"{path.relative_to(PACKAGE)}:{n}: {text.strip()}"
             for path in package_files() if path not in ALLOWED_TO_NAME_FAMILIES
             for n, text in enumerate(path.read_text().splitlines(), 1) if quoted.search(text)]
    assert not found, "family keys belong in backends/registry.py:\n" + "\n".join(found)


def test_no_backend_is_probed_with_hasattr_or_getattr():
    found = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if target in BACKEND_NAMES or target.endswith("backend"):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "declare the attribute in backends/base.py instead:\n" + "\n".join(found)


@pytest.mark.parametrize("row", registry.FAMILIES, ids=lambda row: row.key)
def test_every_row_has_a_whole_backend(row):
    cls = row.backend_class()
    assert issubclass(cls, base.Backend) and not inspect.isabstract(cls), \
        f"{row.backend}: missing {sorted(getattr(cls, '__abstractmethods__', ()))}"
    assert row.denoiser_folder in ("unet", "transformer") and row.lora_prefix in ("unet", "transformer")
    import diffusers

    assert hasattr(diffusers, row.denoiser_class)
