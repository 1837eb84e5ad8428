"""The one exception hierarchy of lambdasplit.

::

    LambdaSplitError
    ├── ConfigError                a bad argument or setting: names the value and what is allowed
    │   └── SplitPointError        layer indices outside 0 <= X <= Y <= N
    ├── ModelLoadError             a model that cannot be found, read or converted
    │   └── UnsupportedModelError  an architecture the generic split cannot wrap exactly
    └── CodedError                 carries a stable ``code`` (the ``code`` of an ERROR frame)
        ├── SessionError           misuse of a session (unknown, bad position, context full, ...)
        ├── Refusal                a request a server refuses: becomes an ERROR frame
        └── WireError              anything that crosses the network
            ├── FrameError         a malformed, truncated, oversized or unknown frame
            ├── RemoteError        the other side answered with an error frame
            ├── StaleConnection    a request made for a connection a reconnect has replaced
            └── UntrustedCertificate  a TLS server whose certificate the device does not trust

Callers catch ``LambdaSplitError`` for everything raised on purpose by this package. Whatever a server
answers with an ERROR frame is a ``CodedError``; its ``code`` is one of those listed in docs/protocol.md.
"""

from __future__ import annotations


class LambdaSplitError(Exception):
    """Base class of every error raised on purpose by lambdasplit."""


class ConfigError(LambdaSplitError, ValueError):
    """A bad argument or setting. The message names the bad value and what is allowed."""


class SplitPointError(ConfigError):
    """Split points outside ``0 <= X <= Y <= N``."""


class ModelLoadError(LambdaSplitError):
    """A model that cannot be found, read or converted."""


class UnsupportedModelError(ModelLoadError):
    """An architecture whose layers the generic split cannot wrap exactly."""


class CodedError(LambdaSplitError):
    """An error with a stable ``code``: the one an ERROR frame carries when it crosses the network.

    Subclasses set a default ``code``; an instance may carry a more specific one.
    """

    code: str = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class SessionError(CodedError):
    """Misuse of a generation session: closed, unknown, at a bad position, or past its context limit."""

    code = "bad_session"


class Refusal(CodedError):
    """A request a server refuses. The frame loop answers it with an ERROR frame for ``session``; when
    ``fatal``, the server closes the connection after that frame."""

    code = "bad_request"

    def __init__(self, code: str, message: str, session: int = 0, fatal: bool = False) -> None:
        super().__init__(message, code)
        self.session, self.fatal = session, fatal


class WireError(CodedError):
    """Anything that goes wrong with data crossing the network (a lost connection, a timeout, ...)."""

    code = "wire_error"


class FrameError(WireError):
    """A malformed, truncated, oversized or unknown frame."""

    code = "bad_frame"


class RemoteError(WireError):
    """The other side answered with an error frame; ``code`` is its stable error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{code}: {message}", code)
        self.remote_message = message


class ConnectionLost(WireError):
    """The connection closed or failed under a request (the server crashed, restarted or went away): what a device
    reconnects after. Its code stays ``wire_error``."""


class StaleConnection(WireError):
    """A request was made for a connection that has since been replaced by a reconnect: session handles
    are only valid on the connection that opened them."""

    code = "stale_connection"


class UntrustedCertificate(WireError):
    """A TLS server presented a certificate the device does not trust (a pin, the known servers file or a CA
    said no). Raised during the TLS handshake, before any byte of the protocol (or the token) is sent.

    ``seen`` is the fingerprint the server presented, ``expected`` the one trusted (None when a CA refused it).
    The message says which option accepts a legitimate change. Clients do not fail over or retry on it.
    """

    code = "untrusted_certificate"

    def __init__(self, message: str, *, address: str, seen: str, expected: str | None = None) -> None:
        super().__init__(message)
        self.address, self.seen, self.expected = address, seen, expected
