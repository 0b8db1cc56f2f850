"""workers.torch_backend: an attempt's Ray Train controller never imports torch.

The controller is a fresh process per attempt and starts the workers only after it has unpickled
what the driver hands it; with Ray's TorchConfig that meant importing torch first (bench/README,
"Submit -> first metric"). That the process group it sets up works is shown by every two-worker
training test (tests/integration), which go through it.
"""

from __future__ import annotations

import subprocess
import sys

import ray.cloudpickle
from ray.train import ScalingConfig

from workers.driver import attempt_trainer
from workers.torch_backend import WorkerTorchConfig


def _loop(config):  # never runs: the trainers here are built, not fitted
    raise AssertionError


def test_an_attempt_picks_the_backend_from_its_workers():
    cpu = attempt_trainer()(_loop, scaling_config=ScalingConfig(num_workers=2))
    gpu = attempt_trainer()(_loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True))
    assert isinstance(cpu.backend_config, WorkerTorchConfig)
    assert (cpu.backend_config.backend, gpu.backend_config.backend) == ("gloo", "nccl")
    assert cpu.backend_config.to_dict() == {"backend": "gloo", "init_method": "env", "timeout_s": 1800}


def test_what_the_controller_unpickles_imports_no_torch(tmp_path):
    """The run context and the controller's callbacks, as the driver ships them, loaded in a
    fresh process that then asks what the controller asks of the backend."""
    trainer = attempt_trainer()(_loop, scaling_config=ScalingConfig(num_workers=2))
    blob = tmp_path / "controller-args.pkl"
    blob.write_bytes(ray.cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks())))
    probe = (
        "import sys, ray.cloudpickle as cp\n"
        f"ctx, callbacks = cp.loads(open({str(blob)!r}, 'rb').read())\n"
        "cfg = ctx.backend_config\n"
        "backend = cfg.backend_cls()\n"
        "print(cfg.framework.name, backend.share_cuda_visible_devices, backend.has_replica_groups)\n"
        "print(sorted(m for m in ('torch', 'ray.train.torch.config') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["TORCH True False", "[]"]


class _RecordingGroup:
    """Stands in for Ray Train's worker group: records what the controller asks each worker to
    run (what the workers then do is the integration tests' part)."""

    def __init__(self, n: int, resources: dict):
        self.n, self.resources, self.calls = n, resources, []

    def __len__(self):
        return self.n

    def get_resources_per_worker(self):
        return self.resources

    def execute_single(self, rank, fn, **kw):
        self.calls.append((rank, fn.__name__, kw))
        return ("10.0.0.7", 29500)

    def execute(self, fn, **kw):
        self.calls.append(("all", fn.__name__, kw))

    def execute_single_async(self, rank, fn, **kw):
        self.calls.append((rank, fn.__name__, kw))
        return rank

    def execute_async(self, fn, **kw):
        self.calls.append(("all", fn.__name__, kw))
        return []


def test_the_backend_takes_ray_torch_steps_in_order(monkeypatch):
    import workers.torch_backend as tb

    monkeypatch.setattr(tb.ray, "get", lambda refs, timeout=None: refs)
    group = _RecordingGroup(2, {"CPU": 1, "GPU": 1})
    cfg = WorkerTorchConfig(timeout_s=60)  # backend left to the workers' resources
    backend = cfg.backend_cls()
    backend.on_start(group, cfg)
    setup = {"backend": "nccl", "world_size": 2, "init_method": "env://", "timeout_s": 60}
    assert group.calls == [
        (0, "get_address_and_port", {}),
        ("all", "_set_master", {"addr": "10.0.0.7", "port": 29500}),
        ("all", "_on_worker", {"name": "_set_torch_distributed_env_vars"}),
        (0, "_on_worker", {"name": "_setup_torch_process_group", "world_rank": 0, **setup}),
        (1, "_on_worker", {"name": "_setup_torch_process_group", "world_rank": 1, **setup}),
    ]
    started = group.calls
    group.calls = []
    backend.on_shutdown(group, cfg)
    assert group.calls == [("all", "_on_worker", {"name": "_shutdown_torch", "destroy_process_group": True})]
    # and the names it calls are Ray's: an upgrade that renames one fails here, not on a worker
    from ray.train.torch import config

    names = {kw["name"] for _, fn, kw in started + group.calls if fn == "_on_worker"}
    assert names == {"_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch"}
    assert all(callable(getattr(config, name)) for name in names)
