"""Bearer tokens mapped to tenants (`SLIMTRAIN_API_TOKENS=token:tenant,token:tenant`).

Tokens are kept only as SHA-256 digests and every request is compared against all of them with
`hmac.compare_digest`, so neither the position of a match nor a token's length shows in the
response time. Without configured tokens, `slimtrain serve` generates one for tenant `default`
and stores it (mode 0600) in the data dir (mode 0700 when it creates it).

`/metrics` takes a token of its own, SLIMTRAIN_METRICS_TOKEN (Prometheus' scrape credential):
its series name every tenant's jobs, so no tenant's API token opens it (docs/security.md)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.errors import SlimtrainError
from service.settings import Settings

TOKEN_FILE = "api-tokens"
DEFAULT_TENANT = "default"
MIN_TOKEN_CHARS = 16
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class AuthError(SlimtrainError):
    code = "unauthorized"


class TokenConfigError(SlimtrainError):
    """SLIMTRAIN_API_TOKENS (or the token file) is malformed; the message never shows a token."""

    code = "invalid_tokens"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "SLIMTRAIN_API_TOKENS") -> dict[str, str]:
    """`token:tenant` entries separated by commas or newlines -> {token: tenant}."""
    out: dict[str, str] = {}
    entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip()]
    if not entries:
        raise TokenConfigError(f"{source}: no tokens; expected token:tenant[,token:tenant...]")
    for n, entry in enumerate(entries, 1):
        token, sep, tenant = entry.rpartition(":")
        if not sep or not token:
            raise TokenConfigError(f"{source}: entry {n} is not token:tenant")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenConfigError(f"{source}: entry {n}: tokens need at least {MIN_TOKEN_CHARS} characters")
        if not TENANT_RE.fullmatch(tenant):
            raise TokenConfigError(
                f"{source}: entry {n}: tenant {tenant!r} must be lowercase letters, digits, '_' or '-' "
                "(up to 64, starting with a letter or digit)"
            )
        if token in out:
            raise TokenConfigError(f"{source}: entry {n} repeats a token")
        out[token] = tenant
    return out


@dataclass(frozen=True)
class TokenAuth:
    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_tokens(cls, tokens: dict[str, str]) -> TokenAuth:
        return cls(tuple((_digest(t), tenant) for t, tenant in tokens.items()))

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant for _, tenant in self.entries})

    def tenant_for(self, token: str | None) -> str:
        if not token:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        found = self.tenant_or_none(token)
        if found is None:
            raise AuthError("invalid bearer token")
        return found

    def tenant_or_none(self, token: str) -> str | None:
        d = _digest(token)
        found = None
        for digest, tenant in self.entries:  # no early exit: constant work per request
            if hmac.compare_digest(digest, d):
                found = tenant
        return found


def check_metrics_token(expected: str | None, token: str | None) -> None:
    """/metrics names every tenant's jobs, so it answers only to the operator's metrics token
    (SLIMTRAIN_METRICS_TOKEN, the bearer token of Prometheus' scrape config), never to a tenant's
    API token; with no metrics token configured it answers to nobody."""
    if not expected:
        raise AuthError(
            "/metrics is closed: set SLIMTRAIN_METRICS_TOKEN on the server and send it as "
            "'Authorization: Bearer <token>' (Prometheus: authorization.credentials_file)"
        )
    if not token:
        raise AuthError("missing bearer token: /metrics needs the metrics token (SLIMTRAIN_METRICS_TOKEN)")
    if not hmac.compare_digest(_digest(expected), _digest(token)):
        raise AuthError("invalid metrics token: /metrics takes SLIMTRAIN_METRICS_TOKEN, not an API token")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_file(settings: Settings) -> Path:
    return settings.data_dir / TOKEN_FILE


def load_auth(settings: Settings, create: bool = False) -> tuple[TokenAuth, str | None]:
    """The server's tokens: SLIMTRAIN_API_TOKENS, else the data dir's token file, else (with
    `create`) a new token for tenant `default`. Returns (auth, the new token or None)."""
    auth, new = _load_auth(settings, create)
    metrics = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if metrics and auth.tenant_or_none(metrics) is not None:
        # the tenant holding it would read every other tenant's job series on /metrics
        raise TokenConfigError(
            "SLIMTRAIN_METRICS_TOKEN is also an API token; give /metrics a token of its own"
        )
    return auth, new


def _load_auth(settings: Settings, create: bool) -> tuple[TokenAuth, str | None]:
    if settings.api_tokens:
        return TokenAuth.from_tokens(parse_tokens(settings.api_tokens)), None
    path = token_file(settings)
    if not path.exists() and create:
        token = secrets.token_urlsafe(32)
        if not path.parent.exists():
            # the data dir holds the token, the database and the artifacts: owner only
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{token}:{DEFAULT_TENANT}\n")
            return TokenAuth.from_tokens({token: DEFAULT_TENANT}), token
    try:
        text = path.read_text()
    except OSError:
        raise TokenConfigError(
            f"no API tokens: set SLIMTRAIN_API_TOKENS or run `slimtrain serve` once to create {path}"
        ) from None
    return TokenAuth.from_tokens(parse_tokens(text, str(path))), None


def local_token(settings: Settings) -> str | None:
    """The first token of the data dir's token file, for a CLI on the server's own machine."""
    try:
        text = token_file(settings).read_text()
    except OSError:
        return None
    for entry in re.split(r"[,\n]", text):
        token, sep, _ = entry.strip().rpartition(":")
        if sep and token:
            return token
    return None
