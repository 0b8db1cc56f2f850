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
