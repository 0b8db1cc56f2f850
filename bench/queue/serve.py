"""The API for bench.queue: `python -m bench.queue.serve PORT`, configured by SLIMTRAIN_* like
`slimtrain serve`, with a Ray stand-in in Ray's place (tests/plugins/fake_ray.py: a 2-CPU
cluster whose drivers stay pending), so that the job it admits holds the cluster and every other
job waits, with no Ray process beside the API to blur its CPU figures."""

from __future__ import annotations

import sys

import uvicorn

from api.app import create_app
from service.settings import Settings
from tests.plugins.fake_ray import FakeRay


def main() -> int:
    app = create_app(Settings(), ray=FakeRay(cpu=2.0))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
