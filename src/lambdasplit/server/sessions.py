"""Per-session body state: one KV cache per session, bound to the connection that opened it."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from transformers import Cache

from lambdasplit.errors import SessionError
from lambdasplit.split.parts import Body


@dataclass
class BodySession:
    handle: int  # connection-local number carried in every frame header
    token: str  # unguessable id, for logs and (later) resuming after a reconnect
    owner: int  # id of the connection that opened it; other connections cannot name it
    cache: Cache | None
    length: int = 0  # positions held in the cache
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0


class SessionStore:
    """All sessions of a server, with the max-sessions limit and idle eviction."""

    def __init__(self, body: Body, max_sessions: int, idle_ttl: float) -> None:
        self.body, self.max_sessions, self.idle_ttl = body, max_sessions, idle_ttl
        self._sessions: dict[tuple[int, int], BodySession] = {}  # (owner, handle) -> session
        self._next_handle = 1
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def positions(self) -> int:
        """Positions held by all sessions' KV caches together."""
        return sum(s.length for s in self._sessions.values())

    def open(self, owner: int) -> BodySession:
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(
                f"the server holds its maximum of {self.max_sessions} sessions; try again later", "too_many_sessions"
            )
        handle = self._next_handle
        self._next_handle = self._next_handle % 0xFFFF_FFFF + 1  # never 0: 0 means "no session"
        session = BodySession(handle, secrets.token_hex(16), owner, self.body.new_cache())
        self._sessions[(owner, handle)] = session
        return session

    def get(self, owner: int, handle: int) -> BodySession:
        session = self._sessions.get((owner, handle))
        if session is None:
            raise SessionError(
                f"no open session {handle} on this connection (closed, evicted after idle, or never opened)",
                "unknown_session",
            )
        session.last_used = time.monotonic()
        return session

    def close(self, owner: int, handle: int) -> None:
        self.get(owner, handle)
        del self._sessions[(owner, handle)]

    def close_owner(self, owner: int) -> int:
        """Free every session of a connection that went away. Returns how many."""
        keys = [k for k in self._sessions if k[0] == owner]
        for k in keys:
            del self._sessions[k]
        return len(keys)

    def evict_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        stale = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_ttl]
        for k in stale:
            del self._sessions[k]
        self.evicted += len(stale)
        return len(stale)
