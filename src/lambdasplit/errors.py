"""The one exception hierarchy of lambdasplit.

::

    LambdaSplitError
    ├── ConfigError            a bad argument or setting: names the value and what is allowed
    │   └── SplitPointError    layer indices outside 0 <= X <= Y <= N
    ├── ModelLoadError         a model that cannot be found, read or converted
    │   └── UnsupportedModelError  an architecture the generic split cannot wrap exactly
    ├── SessionError           misuse of a session (closed, context too long, ...)
    └── WireError              anything that crosses the network
        ├── FrameError         a malformed, truncated, oversized or unknown frame
        └── RemoteError        the other side answered with an error frame

Callers catch ``LambdaSplitError`` for everything raised on purpose by this package.
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


class SessionError(LambdaSplitError):
    """Misuse of a generation session: closed, unknown, or past its context limit.

    ``code`` is stable and travels in error frames (``unknown_session``, ``context_full``, ...).
    """

    def __init__(self, message: str, code: str = "bad_session") -> None:
        super().__init__(message)
        self.code = code


class WireError(LambdaSplitError):
    """Anything that goes wrong with data crossing the network."""


class FrameError(WireError):
    """A malformed, truncated, oversized or unknown frame. Carries a stable ``code`` for error frames."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


class RemoteError(WireError):
    """The other side answered with an error frame; ``code`` is its stable error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message
