"""The Ray Jobs API, as the service uses it: submit a driver, ask its status, stop it, read its
log, and the cluster's capacity.

Authentication: with `RAY_AUTH_MODE=token`, Ray's SDK (`JobSubmissionClient`, the state API)
adds `Authorization: Bearer <token>` itself, taking the token from `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (ray/_private/authentication). The API process
never calls `ray.init` for a remote cluster: it talks HTTP only, so a Ray head outage cannot take
the API down with it (a connected driver exits when the GCS stays unreachable).

What is Ray's and what is private: the endpoints called here are Ray's documented Jobs REST API
(`/api/jobs/...`) and the state API; they travel through the SDK's `_do_request`, a private
method, because it is what adds the cluster's auth headers and cookies. Nothing here depends on
the wording of Ray's answers: Ray 2.60 answers a duplicate submission id with a 500 whose body is
the agent's traceback (`ValueError: Job with submission_id ID already exists`), so a duplicate is
recognised by asking Ray whether it holds the id, not by reading that text
(tests/integration/test_real_ray_contract.py runs all of it against a real head).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.errors import SlimtrainError
from service.limits import Resources

log = logging.getLogger(__name__)

# Ray job statuses (ray.job_submission.JobStatus values).
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"


class ClusterUnavailable(SlimtrainError):
    """The Ray cluster cannot be reached (or answers with a server error): try again later."""

    code = "cluster_unavailable"
    retryable = True


class SubmissionRejected(SlimtrainError):
    """Ray refused the submission itself (a client error): resubmitting will not help."""

    code = "submission_rejected"


@dataclass(frozen=True)
class RayJobInfo:
    status: str
    message: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    alive: bool
    resources: dict[str, float]


def _client_class():
    from ray.job_submission import JobSubmissionClient

    class _Client(JobSubmissionClient):
        # The SDK sends every request without a timeout: one hung dashboard request would stall
        # the scheduler thread forever. Every request here gets one.
        request_timeout: float = 10.0

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", self.request_timeout)
            return super()._do_request(method, endpoint, **kwargs)

    return _Client


class RayJobs:
    """Thread-safe; connects lazily and reconnects after a failure."""

    def __init__(self, address: str | None, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._client = None
        self._lock = threading.Lock()

    def _c(self):
        import requests

        if not self.address:  # the SDK would go looking for any Ray on this machine
            raise ClusterUnavailable(
                "no Ray cluster configured: set SLIMTRAIN_RAY_ADDRESS "
                "(`slimtrain serve` starts one without it)"
            )
        with self._lock:
            if self._client is None:
                cls = _client_class()
                cls.request_timeout = self.timeout
                try:
                    self._client = cls(self.address)
                except (ConnectionError, requests.RequestException, RuntimeError, ValueError) as e:
                    raise ClusterUnavailable(f"Ray Jobs API at {self.address}: {_short(e)}") from None
            return self._client

    def _request(self, method: str, endpoint: str, tolerate_server_error: bool = False, **kw):
        import requests

        c = self._c()
        try:
            r = c._do_request(method, endpoint, **kw)
        except (ConnectionError, requests.RequestException) as e:
            self._reset()
            raise ClusterUnavailable(f"Ray Jobs API at {c._address}: {_short(e)}") from None
        except Exception as e:  # AuthenticationError and the like: the cluster is not usable
            self._reset()
            raise ClusterUnavailable(f"Ray Jobs API at {c._address}: {_short(e)}") from None
        if r.status_code >= 500 and not tolerate_server_error:
            raise ClusterUnavailable(f"Ray Jobs API answered {r.status_code}: {r.text[:300]}")
        return r

    def _reset(self) -> None:
        with self._lock:
            self._client = None

    @property
    def dashboard_url(self) -> str:
        return self._c()._address

    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str], metadata: dict) -> bool:
        """Submit a driver; False when Ray already has this submission id (a repeat after a crash
        between our commit and Ray's answer: the first one stands)."""
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": {"env_vars": env_vars},
            "metadata": {k: str(v) for k, v in metadata.items()},
        }
        r = self._request("POST", "/api/jobs/", tolerate_server_error=True, json_data=body)
        if r.status_code == 200:
            return True
        # Refused: because Ray already holds this id (Ray 2.60 says so only inside a 500's
        # traceback), or for a reason of its own. Ray's own record tells them apart whatever the
        # wording; it also covers a submission Ray took although its answer was an error.
        if self.info(submission_id) is not None:
            log.info("Ray already holds submission %s: the first one stands", submission_id)
            return False
        if r.status_code >= 500:
            raise ClusterUnavailable(f"Ray Jobs API answered {r.status_code}: {_tail(r.text)}")
        raise SubmissionRejected(f"Ray refused submission {submission_id}: {r.status_code} {_tail(r.text)}")

    def info(self, submission_id: str) -> RayJobInfo | None:
        """Status and message, or None when Ray does not know the submission."""
        r = self._request("GET", f"/api/jobs/{submission_id}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ClusterUnavailable(f"Ray Jobs API answered {r.status_code}: {r.text[:300]}")
        d = r.json()
        return RayJobInfo(status=d["status"], message=d.get("message"))

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the driver (SIGTERM, then SIGKILL); False when it was not running."""
        r = self._request("POST", f"/api/jobs/{submission_id}/stop")
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise ClusterUnavailable(f"Ray Jobs API answered {r.status_code}: {r.text[:300]}")
        return bool(r.json().get("stopped"))

    def logs(self, submission_id: str) -> str | None:
        r = self._request("GET", f"/api/jobs/{submission_id}/logs")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ClusterUnavailable(f"Ray Jobs API answered {r.status_code}: {r.text[:300]}")
        return r.json().get("logs", "")

    async def tail_logs(self, submission_id: str) -> AsyncIterator[str]:
        """Chunks of the driver's log as it writes them, until the Ray job ends."""
        c = self._c()
        try:
            async for chunk in c.tail_job_logs(submission_id):
                yield chunk
        except Exception as e:  # the SDK raises RuntimeError/aiohttp errors on a broken stream
            raise ClusterUnavailable(f"following the log of {submission_id}: {_short(e)}") from None

    def nodes(self) -> list[NodeInfo]:
        r = self._request("GET", "/api/v0/nodes?limit=10000&detail=false")
        if r.status_code != 200:
            raise ClusterUnavailable(f"Ray state API answered {r.status_code}: {r.text[:300]}")
        rows = r.json().get("data", {}).get("result", {}).get("result", [])
        return [
            NodeInfo(
                node_id=n.get("node_id", ""),
                alive=n.get("state") == "ALIVE",
                resources={k: float(v) for k, v in (n.get("resources_total") or {}).items()},
            )
            for n in rows
        ]

    def capacity(self) -> Resources:
        return capacity_of(self.nodes())


def capacity_of(nodes: list[NodeInfo]) -> Resources:
    """CPU and GPU of the alive nodes."""
    alive = [n for n in nodes if n.alive]
    return Resources(
        sum(n.resources.get("CPU", 0.0) for n in alive), sum(n.resources.get("GPU", 0.0) for n in alive)
    )


def _tail(text: str, n: int = 500) -> str:
    """The end of an answer: Ray's error bodies are tracebacks, whose last lines say what broke."""
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"
