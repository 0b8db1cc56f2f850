"""Model plugins through the `slimtrain.models` entry point, as an operator installs them: the
test-local package tests/plugins_pkg is pip-installed (no index, no dependencies) into a
temporary folder, and a fresh Python process with that folder on its path discovers it through
importlib.metadata (the real discovery code, `service.catalog.model_plugins`), validates a spec's
`model.args` with the plugin's schema, trains it with the training loop and exports it.

Without the package installed the name is unknown: model code comes only from the registry or
installed plugins, never from a spec (a module path in `model.name` is just an unknown name)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.errors import SpecError
from service.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins_pkg"

SPEC = {
    "name": "plugin",
    "model": {"name": "toy_mlp", "args": {"hidden": 24}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1},
    "compression": {"pruning": {"final_sparsity": 0.5, "start_step": 5, "end_step": 40, "frequency": 5}},
    "checkpoint": {"every_steps": 1000},
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from service import catalog
    from service.artifacts import LocalArtifactStore
    from service.errors import SpecError
    from service.spec import parse_spec
    from workers import export
    from workers.data import load_dataset
    from workers.session import LocalSession
    from workers.train_loop import train

    spec_dict, root = json.loads(sys.argv[1]), sys.argv[2]
    out = {"names": catalog.model_names()}
    try:
        parse_spec({**spec_dict, "model": {"name": "toy_mlp", "args": {"hiden": 3}}})
    except SpecError as e:
        out["bad_args"] = str(e)
    spec = parse_spec(spec_dict)
    data = load_dataset(spec.data)
    store = LocalArtifactStore(root)
    summary = train(spec, data, LocalSession(store, "p"))
    rep = export.export(spec, data, store, "p", summary["step"], {}, 3)
    out["report"] = {k: rep[k] for k in ("model", "accuracy", "float_accuracy", "sparsity")}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The plugin pip-installed into a folder of its own (built from a copy, so the build's
    leftovers stay out of the source tree)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(PLUGIN, src)
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation"]
    subprocess.run([*cmd, "--quiet", "--target", str(target), str(src)], check=True, timeout=300)
    assert (target / "slimtrain_toyplugin").is_dir()
    return target


def test_without_the_plugin_installed_its_name_is_unknown():
    for name in ("toy_mlp", "slimtrain_toyplugin:plugin", "os:system"):
        with pytest.raises(SpecError, match="model.name.*unknown model"):
            parse_spec({**SPEC, "model": {"name": name}})


def test_an_installed_plugin_is_discovered_validated_trained_and_exported(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SPEC), str(tmp_path / "store")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert "toy_mlp" in out["names"]
    # the plugin's own schema checks the args, with the field named
    assert "model.args.hiden" in out["bad_args"]
    rep = out["report"]
    assert rep["model"] == "toy_mlp"
    assert rep["sparsity"]["global"] == pytest.approx(0.5, abs=0.01)
    assert rep["accuracy"] >= 0.85 and rep["float_accuracy"] >= 0.85
