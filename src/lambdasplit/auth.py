"""Bearer tokens: the check every lambdasplit server makes of a connection's ``Authorization`` header.

The body server (``server.base``) and the session servers that block (``syncws``: the share servers, the
PrivateLoRA server, CollaFuse's training server) accept a connection when its header names one of the tokens they
were started with (``serve --token``, repeatable, or ``$LAMBDASPLIT_TOKEN``), or any connection when they have none.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def bearer_authorized(header: str | None, tokens: Sequence[str]) -> bool:
    """Whether ``header`` (``"Bearer TOKEN"``) names one of ``tokens``; with no tokens, any connection is."""
    if not tokens:
        return True
    given = (header or "").removeprefix("Bearer ").encode()
    # compare_digest against every token, without short-circuiting, so timing says nothing.
    return sum(hmac.compare_digest(given, t.encode()) for t in tokens) > 0


def bearer_header(token: str | None) -> dict[str, str] | None:
    """The handshake's ``Authorization`` header for ``token`` (None: send none)."""
    return {"Authorization": f"Bearer {token}"} if token else None
