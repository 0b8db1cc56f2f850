"""Every third-party package the product imports is one a user's install has.

The test suite runs with the `dev` extra, so a module imported only from a function body (psutil
in `workers/ray_runtime.py` once was) passes every test and still fails in the API image or after
a plain `pip install slimtrain`, which install requirements.lock without that extra
(deploy/tools/lock_subset.py). `deploy/tools/check_api_imports.py` catches a module-level import
in the API image's build; this reads every import statement, function bodies included.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("api", "service", "workers")

_spec = importlib.util.spec_from_file_location("lock_subset", ROOT / "deploy" / "tools" / "lock_subset.py")
lock_subset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_subset)

# Imported directly although not declared: each is part of the API of the declared package named
# here (boto3 raises botocore's errors, Ray's job client raises requests' errors, FastAPI's
# responses are Starlette's). Declaring them would pin a second version range to keep in step.
THROUGH = {"botocore": "boto3", "requests": "ray", "starlette": "fastapi"}


def third_party_imports(top: str) -> dict[str, list[str]]:
    """Top-level module name -> 'path:line' of each import of it under the package `top`."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                first = name.split(".")[0]
                if first not in sys.stdlib_module_names and first not in FIRST_PARTY:
                    found.setdefault(first, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # reads every installed package's RECORD


def distribution(module: str) -> str:
    dists = _providers().get(module)
    assert dists, f"no installed distribution provides the module {module!r}"
    return lock_subset.canon(dists[0])


@pytest.fixture(scope="module")
def lock() -> dict:
    return lock_subset.parse_lock((ROOT / "requirements.lock").read_text())


@pytest.fixture(scope="module")
def declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {lock_subset.canon(lock_subset.NAME.match(d).group(1)) for d in deps}


def api_image_drops() -> set[str]:
    """The `--drop` list of the API image's lock subset, read from its Dockerfile."""
    text = (ROOT / "deploy" / "Dockerfile.api").read_text().replace("\\\n", " ")
    match = re.search(r"lock_subset\.py requirements\.lock pyproject\.toml\s+--drop ([^>]+)>", text)
    assert match, "deploy/Dockerfile.api no longer calls lock_subset.py with --drop"
    return {lock_subset.canon(n) for n in match.group(1).split()}


def test_every_import_is_declared_or_comes_with_a_declared_package(lock, declared):
    runtime = set(lock_subset.subset(lock, declared))
    problems = []
    for top in FIRST_PARTY:
        for module, where in sorted(third_party_imports(top).items()):
            dist = distribution(module)
            if dist in declared:
                continue
            through = THROUGH.get(module)
            if through is None:
                problems.append(
                    f"{module} ({dist}), imported at {where[0]}, is not in [project] dependencies"
                )
            elif through not in declared or through not in lock.get(dist, ([], set()))[1]:
                problems.append(f"{module} ({dist}) is no longer locked via {through}")
            elif dist not in runtime:
                problems.append(f"{module} ({dist}) is not in the lock's runtime subset")
    assert not problems, "\n".join(problems)


def test_the_api_and_service_import_nothing_the_api_image_drops():
    """Function bodies included: the image's build only imports the modules."""
    drops = api_image_drops()
    assert {"torch", "transformers", "onnxruntime"} <= drops
    bad = [
        f"{module} ({distribution(module)}) at {', '.join(where)}"
        for top in ("api", "service")
        for module, where in sorted(third_party_imports(top).items())
        if distribution(module) in drops
    ]
    assert not bad, "the API image has no " + "; ".join(bad)


def test_the_scan_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The reason this file exists: a lazy import must count like a module-level one."""
    pkg = tmp_path / "api"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nfrom api import x\nfrom . import y\n\n"
        "def f():\n    import psutil.foo\n    from yaml import safe_load\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert third_party_imports("api") == {"psutil": ["api/m.py:6"], "yaml": ["api/m.py:7"]}
    assert distribution("psutil") == "psutil"
    assert distribution("yaml") == "pyyaml"
