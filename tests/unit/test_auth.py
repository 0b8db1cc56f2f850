"""Bearer tokens: parsing SLIMTRAIN_API_TOKENS, constant-time lookup, the generated token, the
metrics token, and secret files only their owner can read (ours and Ray's)."""

from __future__ import annotations

import os
import stat

import pytest
from pydantic import ValidationError

from service.auth import (
    AuthError,
    TokenAuth,
    TokenConfigError,
    bearer_token,
    check_metrics_token,
    load_auth,
    local_token,
    parse_tokens,
    token_file,
)
from service.settings import Settings
from workers.ray_runtime import ensure_private_ray_token, ray_token_file

A, B = "a" * 24, "b-token-0123456789"


def test_parse_tokens():
    assert parse_tokens(f"{A}:alice,{B}:bob") == {A: "alice", B: "bob"}
    assert parse_tokens(f" {A}:alice \n{B}:bob\n") == {A: "alice", B: "bob"}
    # a token may itself contain ':' (the tenant is after the last one)
    assert parse_tokens(f"x:{A}:team-1") == {f"x:{A}": "team-1"}


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no tokens"),
        (A, "entry 1 is not token:tenant"),
        (":alice", "entry 1 is not token:tenant"),
        ("short:alice", "at least 16 characters"),
        (f"{A}:Alice", "tenant 'Alice' must be lowercase"),
        (f"{A}:", "tenant '' must be"),
        (f"{A}:alice,{A}:bob", "entry 2 repeats a token"),
    ],
)
def test_parse_tokens_errors_name_the_entry_never_the_token(text, message):
    with pytest.raises(TokenConfigError) as e:
        parse_tokens(text)
    assert message in e.value.message and "SLIMTRAIN_API_TOKENS" in e.value.message
    assert A not in e.value.message


def test_tenant_for():
    auth = TokenAuth.from_tokens({A: "alice", B: "bob"})
    assert auth.tenant_for(A) == "alice" and auth.tenant_for(B) == "bob"
    assert auth.tenants == ["alice", "bob"]
    with pytest.raises(AuthError, match="missing bearer token"):
        auth.tenant_for(None)
    for bad in ("", A[:-1], A + "x", B.upper()):
        with pytest.raises(AuthError):
            auth.tenant_for(bad)
    assert all(A not in repr(e) for e in auth.entries)  # only digests are kept


@pytest.mark.parametrize(
    "header,token",
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_token_is_created_once_and_private(tmp_path):
    s = Settings(data_dir=tmp_path / "data")
    with pytest.raises(TokenConfigError, match="run `slimtrain serve` once"):
        load_auth(s)
    auth, token = load_auth(s, create=True)
    assert token and len(token) >= 32 and auth.tenant_for(token) == "default"
    assert mode(token_file(s)) == 0o600
    assert mode(s.data_dir) == 0o700  # created here: the database and artifacts go there too
    again, new = load_auth(s, create=True)
    assert new is None and again.tenant_for(token) == "default"  # printed once, kept after
    assert local_token(s) == token


def test_configured_tokens_win_over_the_file(tmp_path):
    s = Settings(data_dir=tmp_path, api_tokens=f"{A}:alice")
    auth, created = load_auth(s, create=True)
    assert created is None and auth.tenants == ["alice"] and not token_file(s).exists()
    assert local_token(s) is None


def test_an_existing_data_dir_keeps_its_mode(tmp_path):
    tmp_path.chmod(0o755)
    load_auth(Settings(data_dir=tmp_path), create=True)
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "api-tokens") == 0o600


M = "metrics-token-0123456789"


def test_metrics_token():
    check_metrics_token(M, M)
    with pytest.raises(AuthError, match="missing bearer token.*SLIMTRAIN_METRICS_TOKEN"):
        check_metrics_token(M, None)
    for bad in (M[:-1], M + "x", M.upper(), A):
        with pytest.raises(AuthError, match="invalid metrics token") as e:
            check_metrics_token(M, bad)
        assert M not in e.value.message
    for token in (None, M, A):  # none configured: closed to everyone
        with pytest.raises(AuthError, match="/metrics is closed: set SLIMTRAIN_METRICS_TOKEN"):
            check_metrics_token(None, token)


def test_metrics_token_setting_is_secret_and_long_enough(tmp_path):
    s = Settings(data_dir=tmp_path, metrics_token=M)
    assert s.metrics_token.get_secret_value() == M and M not in repr(s)
    with pytest.raises(ValidationError) as e:
        Settings(data_dir=tmp_path, metrics_token="short-secret")
    assert "at least 16 characters" in str(e.value) and "short-secret" not in str(e.value)


@pytest.mark.parametrize("where", ["env", "file"])
def test_metrics_token_must_not_be_an_api_token(tmp_path, where):
    """The tenant holding it would read every tenant's job series on /metrics."""
    if where == "env":
        s = Settings(data_dir=tmp_path, api_tokens=f"{A}:alice,{M}:bob", metrics_token=M)
    else:
        (tmp_path / "api-tokens").write_text(f"{M}:default\n")
        s = Settings(data_dir=tmp_path, metrics_token=M)
    with pytest.raises(TokenConfigError, match="SLIMTRAIN_METRICS_TOKEN is also an API token") as e:
        load_auth(s)
    assert M not in e.value.message
    auth, _ = load_auth(Settings(data_dir=tmp_path, api_tokens=f"{A}:alice", metrics_token=M))
    assert auth.tenants == ["alice"]


# Ray's token file: Ray creates ~/.ray/auth_token with the umask's mode (0644); the embedded head
# (workers/ray_runtime.py) creates it first, private.


def test_ray_token_file_location(tmp_path):
    assert ray_token_file({"HOME": str(tmp_path)}) == tmp_path / ".ray" / "auth_token"
    assert ray_token_file({"HOME": "/x", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == tmp_path / "t"
    assert ray_token_file({"HOME": "/x", "RAY_AUTH_TOKEN": "abc"}) is None


def test_ray_token_is_created_private(tmp_path):
    env = {"HOME": str(tmp_path)}
    path = ensure_private_ray_token(env)
    assert path == tmp_path / ".ray" / "auth_token"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16)  # Ray's own format: 32 random bytes, hex
    assert ensure_private_ray_token(env) == path and path.read_text() == token  # kept


def test_ray_token_readable_by_others_is_narrowed(tmp_path):
    path = tmp_path / "token"
    path.write_text("f" * 64)
    path.chmod(0o644)
    assert ensure_private_ray_token({"RAY_AUTH_TOKEN_PATH": str(path)}) == path
    assert mode(path) == 0o600 and path.read_text() == "f" * 64


def test_ray_token_from_the_environment_needs_no_file(tmp_path):
    assert ensure_private_ray_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "f" * 64}) is None
    assert not os.path.exists(tmp_path / ".ray")
