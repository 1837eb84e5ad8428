"""The share servers' peer link (``mpc.peer``) on real sockets: frames sealed under the session's link key, and a
pairing that only a holder of the key can take.

What it must show: the two parties exchange the same numbers as before, none of a payload's words cross the link in
the clear, a frame altered, replayed or sealed under another key is refused (``peer_unauthenticated``), and a hello
without the key neither takes a session nor pushes the real server 1 out; server 1 refuses a server 0 that cannot
prove the key.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable

import pytest
import torch

from lambdasplit.errors import WireError
from lambdasplit.mpc.peer import (
    FRAME,
    HELLO,
    HELLO_MAGIC,
    LINK_KEY_BYTES,
    PeerChannel,
    PeerListener,
    hello_proof,
    join,
)

TIMEOUT = 5.0
SESSION = b"s" * 16
FINGERPRINT = b"f" * 32


def key() -> bytes:
    return secrets.token_bytes(LINK_KEY_BYTES)


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except Exception as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def finished(thread: threading.Thread, result: dict[str, object]) -> object:
    thread.join(3 * TIMEOUT)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on loopback (the link is TCP: it sets TCP_NODELAY)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname()[:2], timeout=TIMEOUT)
        b, _ = server.accept()
    return a, b


def pair(key0: bytes, key1: bytes) -> tuple[PeerChannel, PeerChannel]:
    a, b = tcp_pair()
    return PeerChannel(a, SESSION, key0, 0, TIMEOUT), PeerChannel(b, SESSION, key1, 1, TIMEOUT)


def test_the_parties_exchange_their_tensors() -> None:
    k = key()
    p0, p1 = pair(k, k)
    x0, x1 = torch.arange(-6, 6).view(3, 4), torch.randint(-(2**62), 2**62, (3, 4))
    for step in range(2):
        p0.begin(step)
        p1.begin(step)
        for _ in range(3):
            thread, result = in_thread(lambda: p1.exchange(x1))
            assert torch.equal(p0.exchange(x0), x1)
            assert torch.equal(finished(thread, result), x0)  # type: ignore[arg-type]
    p0.close()
    p1.close()


def frame_of(channel: PeerChannel, tensor: torch.Tensor) -> bytes:
    """The bytes ``channel`` puts on the link for ``tensor`` (read raw on the other end of the connection)."""
    a, b = tcp_pair()
    channel.sock = a
    a.setblocking(False)
    thread, _ = in_thread(lambda: channel.exchange(tensor))  # waits for an answer that never comes
    b.settimeout(TIMEOUT)
    data = b""
    words = 8 * tensor.numel()
    while len(data) < FRAME.size + words + 16:
        data += b.recv(1 << 16)
    b.close()  # the exchange ends with peer_gone
    thread.join(TIMEOUT)
    return data


def test_no_word_of_a_payload_crosses_the_link_in_the_clear() -> None:
    channel = PeerChannel(tcp_pair()[0], SESSION, key(), 0, TIMEOUT)
    tensor = torch.randint(-(2**62), 2**62, (64,))
    frame = frame_of(channel, tensor)
    _, session, _, _, nbytes = FRAME.unpack(frame[: FRAME.size])
    assert session == SESSION and nbytes == 8 * 64 + 16  # the words and GCM's tag
    payload = frame[FRAME.size :]
    words = tensor.numpy().tobytes()
    assert not any(words[i : i + 8] in payload for i in range(0, len(words), 8))


def test_a_frame_under_another_key_is_refused() -> None:
    p0, p1 = pair(key(), key())
    thread, _ = in_thread(lambda: p1.exchange(torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(WireError) as caught:
        p0.exchange(torch.zeros(4, dtype=torch.int64))
    assert caught.value.code == "peer_unauthenticated" and "link key" in str(caught.value)
    p0.close()
    p1.close()
    thread.join(TIMEOUT)


@pytest.mark.parametrize("tamper", ["payload", "header", "replayed"])
def test_an_altered_or_replayed_frame_is_refused(tamper: str) -> None:
    """A man in the middle between the servers relays party 1's frames to party 0, changed."""
    k = key()
    sender = PeerChannel(tcp_pair()[0], SESSION, k, 1, TIMEOUT)
    tensor = torch.arange(16)
    first = frame_of(sender, tensor)
    assert first[FRAME.size :] != frame_of(sender, tensor)[FRAME.size :]  # the same words: a fresh nonce
    magic, session, step, seq, nbytes = FRAME.unpack(first[: FRAME.size])
    a, b = tcp_pair()
    receiver = PeerChannel(a, SESSION, k, 0, TIMEOUT)
    if tamper == "payload":
        forged = bytearray(first)
        forged[FRAME.size + 3] ^= 1
        b.sendall(bytes(forged))
    elif tamper == "header":  # the header is authenticated too: the frame claims another step
        receiver.begin(step + 1)
        b.sendall(FRAME.pack(magic, session, step + 1, seq, nbytes) + first[FRAME.size :])
    else:  # accepted once, then sent again as round 1 (with round 1's number, or the order check would catch it)
        b.sendall(first)
        assert torch.equal(receiver.exchange(tensor), tensor)
        b.sendall(FRAME.pack(magic, session, step, seq + 1, nbytes) + first[FRAME.size :])
    with pytest.raises(WireError) as caught:
        receiver.exchange(tensor)
    assert caught.value.code == "peer_unauthenticated"
    receiver.close()
    b.close()


def test_a_hello_without_the_key_neither_takes_the_session_nor_pushes_server_1_out() -> None:
    k = key()
    listener = PeerListener("127.0.0.1", 0, FINGERPRINT, TIMEOUT)
    try:
        impostors = []
        for _ in range(2):  # one before the real server 1, one after it
            sock = socket.create_connection(listener.address, timeout=TIMEOUT)
            sock.sendall(HELLO.pack(HELLO_MAGIC, SESSION, FINGERPRINT, hello_proof(key(), SESSION, FINGERPRINT)))
            impostors.append(sock)
            if len(impostors) == 1:
                joining, joined = in_thread(lambda: join(listener.address, SESSION, FINGERPRINT, k, TIMEOUT))
        deadline = time.monotonic() + TIMEOUT  # all three wait for the device's open before server 0 claims
        while len(listener._arrived.get(SESSION, [])) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        claimed = listener.claim(SESSION, k, TIMEOUT)
        server1 = finished(joining, joined)
        assert isinstance(server1, PeerChannel)
        for sock in impostors:
            assert sock.recv(1) == b"\x00"  # refused
            sock.close()
        thread, result = in_thread(lambda: server1.exchange(torch.tensor([7])))
        assert torch.equal(claimed.exchange(torch.tensor([5])), torch.tensor([7]))
        assert torch.equal(finished(thread, result), torch.tensor([5]))  # type: ignore[arg-type]
        claimed.close()
        server1.close()
    finally:
        listener.close()


def test_a_hello_for_a_session_paired_already_is_refused_at_once() -> None:
    k = key()
    listener = PeerListener("127.0.0.1", 0, FINGERPRINT, 30.0)  # unclaimed hellos would wait 30 s
    try:
        joining, joined = in_thread(lambda: join(listener.address, SESSION, FINGERPRINT, k, TIMEOUT))
        claimed = listener.claim(SESSION, k, TIMEOUT)
        server1 = finished(joining, joined)
        assert isinstance(server1, PeerChannel)
        # server 1's hello replayed (seen on the path), after the pairing: refused on arrival, not after 30 s
        late = socket.create_connection(listener.address, timeout=TIMEOUT)
        late.sendall(HELLO.pack(HELLO_MAGIC, SESSION, FINGERPRINT, hello_proof(k, SESSION, FINGERPRINT)))
        assert late.recv(1) == b"\x00"
        late.close()
        assert SESSION not in listener._arrived
        claimed.close()
        server1.close()
    finally:
        listener.close()


def test_server_1_refuses_a_server_0_without_the_key() -> None:
    fake = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        sock, _ = fake.accept()
        sock.recv(HELLO.size)
        sock.sendall(b"\x01" + bytes(32))  # "joined", with no proof of the key
        sock.recv(1)

    thread, _ = in_thread(answer)
    with pytest.raises(WireError) as caught:
        join(fake.getsockname()[:2], SESSION, FINGERPRINT, key(), TIMEOUT)
    assert caught.value.code == "peer_unauthenticated"
    thread.join(TIMEOUT)
    fake.close()


def test_a_server_1_with_another_key_is_refused_by_server_0() -> None:
    listener = PeerListener("127.0.0.1", 0, FINGERPRINT, 1.0)
    try:
        joining, joined = in_thread(lambda: join(listener.address, SESSION, FINGERPRINT, key(), 1.0))
        with pytest.raises(WireError) as caught:
            listener.claim(SESSION, key(), 1.0)
        assert caught.value.code == "peer_timeout"
        with pytest.raises(WireError) as refused:
            finished(joining, joined)
        assert refused.value.code == "session_mismatch"
    finally:
        listener.close()
