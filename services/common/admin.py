"""Authorization of admin RPCs (ranking's Reload, the rollout controller's RPCs): a bearer
token in the ``authorization`` metadata, compared in constant time, never logged or echoed.

Admin RPCs fail closed: a service started without a token refuses every one of them
(PERMISSION_DENIED: there is no token that could authorize it).
"""

from __future__ import annotations

import hmac

import grpc

from services.common.errors import PermissionDenied, Unauthenticated

AUTHORIZATION_KEY = "authorization"


class AdminToken:
    """The token a service was given (None: admin RPCs disabled)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def authorize(self, context: grpc.ServicerContext, rpc: str) -> None:
        """Return when the call carries ``authorization: Bearer <token>``; raise
        Unauthenticated (missing or wrong token) or PermissionDenied (no token configured)."""
        if self._token is None:
            raise PermissionDenied(
                "admin RPCs are disabled on this service: it was started without an admin "
                "token (set HOMEFEED_ADMIN_TOKEN to enable them)"
            )
        given = [v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_KEY]
        if not given:
            raise Unauthenticated(
                f"{rpc} is an admin RPC: send metadata 'authorization: Bearer <admin token>'"
            )
        scheme, _, token = str(given[0]).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._token
        ):
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <admin token>' with the token the "
                "service was given (HOMEFEED_ADMIN_TOKEN); the one sent does not match"
            )
