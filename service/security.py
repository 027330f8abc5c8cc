"""Auth checks (constant-time) and confinement of adapter paths to the configured roots."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import AuthError, BadRequestError, ForbiddenError

__all__ = ["check_bearer", "describe_admin_access", "require_admin", "resolve_in_roots", "validate_adapter_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


def check_bearer(header: str | None, secrets: Sequence[str], what: str) -> None:
    """Require `Authorization: Bearer <one of secrets>`; compares in constant time."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError(f"{what} requires an 'Authorization: Bearer <token>' header")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(token.strip().encode(), secret.encode())
    if not matched:
        raise AuthError(f"the bearer token is not valid for {what}")


def require_admin(header: str | None, admin_token: str | None, loopback_bind: bool, api_keys: bool = False) -> None:
    """Admin routes: the admin token when one is set; otherwise only on a loopback bind without API keys.

    With `--api-key` set, inference needs a key, so an open admin API would be the weaker door: it is closed.
    """
    if admin_token:
        check_bearer(header, [admin_token], "the admin API")
    elif api_keys:
        raise ForbiddenError(
            "the admin API is disabled: --api-key protects inference but no --admin-token is set; "
            "start the server with --admin-token (env LOKR_ADMIN_TOKEN) to use it",
            code="admin_disabled",
        )
    elif not loopback_bind:
        raise ForbiddenError(
            "the admin API is disabled: the server listens on a non-loopback address without --admin-token",
            code="admin_disabled",
        )


def describe_admin_access(admin_token: str | None, loopback_bind: bool, api_keys: bool) -> str:
    """One phrase saying how the admin API is protected (logged at start-up); mirrors `require_admin`."""
    if admin_token:
        return "needs the --admin-token bearer token"
    if api_keys:
        return "disabled (--api-key is set without --admin-token)"
    if loopback_bind:
        return "open to local clients without a token (loopback bind, no --admin-token)"
    return "disabled (non-loopback bind without --admin-token)"


def validate_adapter_name(name: object, base_name: str) -> str:
    """Names are 1-128 chars of letters, digits and `._:@+-`, starting alphanumeric, not the base name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequestError(
            f"invalid adapter name {str(name)[:64]!r}: use 1-128 letters, digits or ._:@+- "
            "starting with a letter or digit",
            code="invalid_adapter_name",
        )
    if name == base_name:
        raise BadRequestError(f"{name!r} is the base model's name; pick another adapter name", code="name_clash")
    return name


def resolve_in_roots(source: str, roots: Sequence[Path]) -> Path:
    """The real path of `source` (relative to a root, or absolute), which must lie inside a root."""
    if not roots:
        raise ForbiddenError("loading adapters by path is disabled: start the server with --adapter-root DIR")
    if not isinstance(source, str) or not source or "\x00" in source:
        raise BadRequestError("adapter source must be a non-empty path", code="invalid_source")
    candidates = [Path(source)] if os.path.isabs(source) else [root / source for root in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        for root in roots:
            real_root = os.path.realpath(root)
            if os.path.commonpath([real_root, str(real)]) == real_root and real.exists():
                return real
    inside = any(
        os.path.commonpath([os.path.realpath(r), os.path.realpath(c)]) == os.path.realpath(r)
        for r in roots
        for c in candidates
    )
    if inside:
        raise BadRequestError(f"adapter source {source!r} does not exist under the adapter roots", code="not_found")
    raise ForbiddenError(f"adapter source {source!r} resolves outside every --adapter-root; refused")
