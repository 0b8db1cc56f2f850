"""Bearer tokens: parsing SLIMTRAIN_API_TOKENS, constant-time lookup, the generated token."""

from __future__ import annotations

import stat

import pytest

from service.auth import (
    AuthError,
    TokenAuth,
    TokenConfigError,
    bearer_token,
    load_auth,
    local_token,
    parse_tokens,
    token_file,
)
from service.settings import Settings

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


def test_generated_token_is_created_once_and_private(tmp_path):
    s = Settings(data_dir=tmp_path)
    with pytest.raises(TokenConfigError, match="run `slimtrain serve` once"):
        load_auth(s)
    auth, token = load_auth(s, create=True)
    assert token and len(token) >= 32 and auth.tenant_for(token) == "default"
    assert stat.S_IMODE(token_file(s).stat().st_mode) == 0o600
    again, new = load_auth(s, create=True)
    assert new is None and again.tenant_for(token) == "default"  # printed once, kept after
    assert local_token(s) == token


def test_configured_tokens_win_over_the_file(tmp_path):
    s = Settings(data_dir=tmp_path, api_tokens=f"{A}:alice")
    auth, created = load_auth(s, create=True)
    assert created is None and auth.tenants == ["alice"] and not token_file(s).exists()
    assert local_token(s) is None
