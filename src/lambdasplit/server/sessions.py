"""The sessions of a server, whatever they hold: a body's KV cache (``BodyState``) or an image in progress.

A session is bound to the connection that opened it (``owner``): its handle is a small number carried in
every frame header, valid on that connection only, so another connection cannot name it. The store
enforces the server's session cap and evicts sessions left idle longer than ``idle_ttl``. Whatever way a session
leaves (closed, its connection gone, evicted), ``on_close`` is told, so what it holds elsewhere (the KV caches
of a body's stage actors on other machines) is freed too.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lambdasplit.errors import SessionError

S = TypeVar("S")


def _after(handle: int) -> int:
    """The next handle: u32 in the frame header, never 0 (0 means "no session")."""
    return handle % 0xFFFF_FFFF + 1


@dataclass
class Held(Generic[S]):
    """One session: what it holds and whose it is."""

    value: S
    handle: int  # connection-local number carried in every frame header
    owner: int  # id of the connection that opened it
    token: str = field(default_factory=lambda: secrets.token_hex(16))  # unguessable id, for logs
    last_used: float = field(default_factory=time.monotonic)


class SessionStore(Generic[S]):
    """All sessions of a server, with the max-sessions limit and idle eviction.

    ``what`` names a session in refusals ("session", "image session"); ``on_close`` is called with the value of
    every session that leaves the store.
    """

    def __init__(
        self,
        max_sessions: int,
        idle_ttl: float,
        what: str = "session",
        on_close: Callable[[S], None] | None = None,
    ) -> None:
        self.max_sessions, self.idle_ttl, self.what = max_sessions, idle_ttl, what
        self.on_close = on_close
        self._held: dict[tuple[int, int], Held[S]] = {}  # (owner, handle) -> session
        self._next_handle = 1
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held[S]]:
        return iter(list(self._held.values()))

    def open(self, owner: int, make: Callable[[int], S]) -> Held[S]:
        """A new session of ``owner`` holding ``make(handle)``; refused at the cap (``too_many_sessions``)."""
        if len(self._held) >= self.max_sessions:
            raise SessionError(
                f"the server holds its maximum of {self.max_sessions} {self.what}s; try again later",
                "too_many_sessions",
            )
        handle = self._next_handle
        while (owner, handle) in self._held:  # after a wrap-around, skip what this connection still holds
            handle = _after(handle)
        held = Held(make(handle), handle, owner)  # `make` may refuse: then no handle is used up
        self._next_handle = _after(handle)
        self._held[(owner, handle)] = held
        return held

    def get(self, owner: int, handle: int) -> Held[S]:
        held = self._held.get((owner, handle))
        if held is None:
            raise SessionError(
                f"no open {self.what} {handle} on this connection (closed, evicted after idle, or never opened)",
                "unknown_session",
            )
        held.last_used = time.monotonic()
        return held

    def close(self, owner: int, handle: int) -> Held[S]:
        held = self.get(owner, handle)
        del self._held[(owner, handle)]
        self._closed([held])
        return held

    def close_owner(self, owner: int) -> list[Held[S]]:
        """Free every session of a connection that went away; returns them."""
        keys = [k for k in self._held if k[0] == owner]
        gone = [self._held.pop(k) for k in keys]
        self._closed(gone)
        return gone

    def evict_idle(self, now: float | None = None) -> int:
        """Free the sessions idle longer than ``idle_ttl``; how many."""
        now = time.monotonic() if now is None else now
        stale = [k for k, h in self._held.items() if now - h.last_used > self.idle_ttl]
        self._closed([self._held.pop(k) for k in stale])
        self.evicted += len(stale)
        return len(stale)

    def _closed(self, gone: list[Held[S]]) -> None:
        if self.on_close is not None:
            for held in gone:
                self.on_close(held.value)
