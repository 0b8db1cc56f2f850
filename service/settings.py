"""The one settings object (pydantic-settings, env prefix SLIMTRAIN_). Every default works with
zero configuration on one machine: data under ./slimtrain-data, SQLite, a local artifact folder,
an embedded Ray head."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # Errors never echo a value: several settings are secrets (tokens, a database URL's password).
    model_config = SettingsConfigDict(env_prefix="SLIMTRAIN_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(default=Path("./slimtrain-data"), description="Where local state lives.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/slimtrain.db"
    )
    artifact_uri: str | None = Field(
        default=None, description="file:///path or s3://bucket/prefix; default <data_dir>/artifacts"
    )
    s3_endpoint_url: str | None = Field(default=None, description="MinIO or any S3-compatible endpoint.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster address; unset starts an embedded local head."
    )
    ray_dashboard_port: int = Field(default=8265, description="Embedded head's dashboard/Jobs API port.")
    ray_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Embedded head only: the niceness of its raylet and of every process it starts "
        "(job drivers, Ray Train's actors and workers), so that the API, sharing the machine's "
        "cores with training, answers first when they are contended. 0: the same as the API.",
    )
    api_tokens: str | None = Field(default=None, description="token:tenant,token:tenant")
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token Prometheus sends to GET /metrics (which names every tenant's "
        "jobs); unset, /metrics answers 401 to every caller. Never one of the API tokens.",
    )
    host: str = Field(default="127.0.0.1")
    port: int = Field(default=8000)

    # Limits a job must stay within (422 at submit when above them).
    max_workers: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=1000, ge=1)
    max_steps: int = Field(default=1_000_000, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_model_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Largest weights file PUT /v1/models/{name} accepts."
    )
    max_dataset_bytes: int = Field(
        default=8 * 1024**3, ge=1024, description="Largest dataset file PUT /v1/datasets/{name} accepts."
    )
    # NoDecode: a comma-separated list in the environment, not JSON.
    s3_allowed_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="s3://bucket/prefix, comma-separated: where a job's s3:// data.uri, "
        "data.tokenizer and model.init.uri may point. Empty: s3:// is refused, so clients cannot "
        "read whatever the service's credentials reach (docs/security.md).",
    )
    stream_above_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="data.streaming auto: a dataset file larger than this streams through Ray Data "
        "instead of being loaded into every worker's memory.",
    )

    # Job service (api/, service/scheduler.py, service/reconciler.py).
    ray_dashboard_url: str | None = Field(
        default=None, description="Ray Jobs API URL; default: looked up from the cluster at ray_address."
    )
    driver_python: str | None = Field(
        default=None,
        description="Interpreter of the Ray Job entrypoint on the cluster; default: the API's own "
        "(right when API and Ray share an image or a machine).",
    )
    run_scheduler: bool = Field(
        default=True,
        description="Campaign for leadership here: the leader among the API processes on one "
        "database runs the scheduler, reconciler, ingest and sweeps (service/leader.py).",
    )
    # Leader election (service/leader.py): the leader renews its lease every renew interval; when
    # it dies, another process leads within ttl + renew interval.
    leader_lease_ttl_s: float = Field(
        default=10.0, gt=0, description="How long a leader's lease lasts unless renewed."
    )
    leader_renew_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the leader renews its lease and followers try to take it.",
    )
    leader_takeover_dead_local: bool = Field(
        default=True,
        description="Take over at once from a leader that ran on this machine (same kernel and "
        "PID namespace) and whose process is gone, instead of waiting out its lease.",
    )
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    ingest_interval_s: float = Field(default=0.5, gt=0)
    # Sweeps (service/sweeps): how often running sweeps create trials and record results.
    sweep_interval_s: float = Field(default=2.0, gt=0)
    max_sweep_trials: int = Field(default=64, ge=1, description="Trials one sweep may ask for.")
    heartbeat_timeout_s: float = Field(
        default=60.0, gt=0, description="A live job the Ray cluster has not confirmed for this long is lost."
    )
    request_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads running requests' database work; default: the CPU count (more Python "
        "threads than cores contend for the GIL and lower throughput).",
    )

    @model_validator(mode="after")
    def _renew_before_expiry(self):
        if self.leader_renew_interval_s * 2 > self.leader_lease_ttl_s:
            raise ValueError(
                "leader_renew_interval_s must be at most half of leader_lease_ttl_s, so that one "
                "late renewal does not cost the lease"
            )
        return self

    @field_validator("data_dir")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("s3_allowed_prefixes", mode="before")
    @classmethod
    def _prefixes(cls, v):
        items = [p.strip() for p in v.split(",")] if isinstance(v, str) else list(v or [])
        out = []
        for p in filter(None, items):
            bucket, _, key = p.removeprefix("s3://").partition("/")
            if (
                not p.startswith("s3://")
                or not bucket
                or ".." in key.split("/")
                or any(c.isspace() for c in p)
            ):
                raise ValueError(f"{p!r} is not s3://bucket or s3://bucket/prefix")
            out.append(f"s3://{bucket}/{key.strip('/')}".rstrip("/"))
        return out

    @field_validator("metrics_token")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("the metrics token needs at least 16 characters (e.g. openssl rand -hex 32)")
        return v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'slimtrain.db'}"

    @property
    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or (self.data_dir / "artifacts").as_uri()


@cache
def get_settings() -> Settings:
    return Settings()
