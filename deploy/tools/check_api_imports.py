"""Imports every module of api/ and service/ plus the workers' readers the API uses, and fails if
any of them pulled in a training-only package. Runs in the API image's build (which has no torch,
so an import of it fails there outright) and anywhere the package is installed:

    python deploy/tools/check_api_imports.py
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

# What the API calls from workers/: the upload checks of service/datasets.py.
WORKER_MODULES = ("workers.data.formats", "workers.data.archives", "workers.data.sources")
TRAINING_ONLY = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "torch_pruning")


def main() -> int:
    names = list(WORKER_MODULES)
    for pkg_name in ("api", "service"):
        pkg = importlib.import_module(pkg_name)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")]
    for name in names:
        # Alembic's revision scripts run only inside `alembic upgrade`.
        if ".migrations" not in name:
            importlib.import_module(name)
    loaded = sorted(m for m in TRAINING_ONLY if m in sys.modules)
    if loaded:
        print(f"the API imports training-only packages: {', '.join(loaded)}", file=sys.stderr)
        return 1
    print(f"{len(names)} modules import without {', '.join(TRAINING_ONLY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
