"""Ray Train's torch process-group setup, without torch in the process that orders it.

Ray Train's controller is a fresh Python process per attempt, and the workers are started only
once it has unpickled the run's backend config. `ray.train.torch.TorchConfig` lives in a module
that imports torch at its top, so every attempt's controller imported torch before a worker
existed, though the controller itself never touches a tensor (bench/README, "No torch in Ray
Train's controller", has the first metric with and without it). This config and backend do the same steps
as Ray's `_TorchBackend` (pinned Ray 2.60) in the same order, but every step that needs torch
runs on the workers, through Ray's own worker-side functions imported there. The module imports
only Ray: keep it that way (tests/unit/test_torch_backend.py loads what the controller gets in
a fresh process and fails if torch comes with it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)


def _on_worker(name: str, **kwargs):
    """Ray's worker-side step `name` of ray.train.torch.config, imported in the worker."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


@dataclass
class WorkerTorchConfig(BackendConfig):
    """`TorchConfig` with the env:// rendezvous. `backend` None is filled in by TorchTrainer from
    the scaling config (nccl with GPUs, else gloo), so the controller never asks torch."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _WorkerTorchBackend

    @property
    def train_func_context(self):
        # Entered on the workers only: sets the default CUDA device.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class _WorkerTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: WorkerTorchConfig) -> None:
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        # LOCAL_RANK and the like, which init_process_group reads.
        worker_group.execute(_on_worker, name="_set_torch_distributed_env_vars")
        n = len(worker_group)
        # None only outside TorchTrainer, which fills it in; then as Ray's: nccl on GPU workers.
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        )
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _on_worker,
                    name="_setup_torch_process_group",
                    backend=backend,
                    world_rank=i,
                    world_size=n,
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for i in range(n)
            ]
        )

    def on_shutdown(self, worker_group, backend_config) -> None:
        futures = worker_group.execute_async(
            _on_worker, name="_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        timeout_s = int(
            os.environ.get(
                TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
            )
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            # As Ray's: a worker stuck in a collective must not hold up the attempt's end.
            log.warning("torch process group shutdown timed out after %s s", timeout_s)
