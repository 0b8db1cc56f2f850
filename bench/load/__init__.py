"""Load and soak benchmark of the API under training jobs: `python -m bench.load` (see run.py)."""
