"""Where TLS state lives on disk, and how it is written: private to the user, never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def state_dir() -> Path:
    """lambdasplit's state: ``$LAMBDASPLIT_STATE``, else ``$XDG_STATE_HOME/lambdasplit``, else
    ``~/.local/state/lambdasplit``. It holds a server's self-signed certificate (``tls/``) and a device's
    known servers (``known_servers``); neither is a cache: deleting them changes what a device trusts."""
    if os.environ.get("LAMBDASPLIT_STATE"):
        return Path(os.environ["LAMBDASPLIT_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "lambdasplit"


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700), created with its parents if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by its owner only (0600).

    A temporary file in the same folder is renamed over the target, so a reader (or a second process doing the
    same) sees the old file or the new one, never a part of one.
    """
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
