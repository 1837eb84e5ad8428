"""The one session table of both servers: cap, handles bound to their connection, wrap-around, eviction."""

from __future__ import annotations

import pytest

from lambdasplit.errors import CodedError, SessionError
from lambdasplit.server.sessions import SessionStore


def test_sessions_are_bound_to_their_connection_and_capped() -> None:
    store: SessionStore[str] = SessionStore(max_sessions=2, idle_ttl=60, what="image session")
    a = store.open(owner=1, make=lambda handle: f"a{handle}")
    b = store.open(owner=2, make=lambda handle: f"b{handle}")
    assert (a.value, b.value) == ("a1", "b2") and a.token != b.token
    with pytest.raises(SessionError) as info:
        store.get(owner=2, handle=a.handle)  # another connection cannot name it
    assert info.value.code == "unknown_session" and "image session" in str(info.value)
    with pytest.raises(SessionError) as info:
        store.open(owner=1, make=str)
    assert info.value.code == "too_many_sessions" and isinstance(info.value, CodedError)
    assert [held.value for held in store.close_owner(1)] == ["a1"] and len(store) == 1
    assert store.close(2, b.handle) is b and len(store) == 0


def test_a_refused_session_uses_no_handle_and_handles_wrap_around_without_zero() -> None:
    store: SessionStore[int] = SessionStore(max_sessions=4, idle_ttl=60)

    def refuse(handle: int) -> int:
        raise ValueError("bad options")

    with pytest.raises(ValueError):
        store.open(1, refuse)
    assert store.open(1, int).handle == 1  # the refusal did not use handle 1
    store._next_handle = 0xFFFF_FFFF
    assert store.open(1, int).handle == 0xFFFF_FFFF
    assert store.open(1, int).handle == 2  # wrapped past 0 ("no session") to 1, which connection 1 still holds


def test_idle_sessions_are_evicted_and_counted() -> None:
    store: SessionStore[int] = SessionStore(max_sessions=4, idle_ttl=10)
    old, new = store.open(1, int), store.open(1, int)
    new.last_used = old.last_used + 20
    assert store.evict_idle(now=old.last_used + 15) == 1 and store.evicted == 1
    assert [held.handle for held in store] == [new.handle]


def test_every_way_out_of_the_store_calls_on_close_once() -> None:
    """CLOSE, a connection gone and idle eviction all tell ``on_close``: a body held elsewhere frees its caches."""
    closed: list[int] = []
    store: SessionStore[int] = SessionStore(max_sessions=4, idle_ttl=10, on_close=closed.append)
    a, b, c = (store.open(1, lambda handle: handle * 10) for _ in range(3))
    store.close(1, a.handle)
    c.last_used = b.last_used + 20
    assert store.evict_idle(now=b.last_used + 15) == 1
    assert store.close_owner(1) == [c]
    assert closed == [a.value, b.value, c.value]
