"""``lambdasplit trust``: the servers this device trusts on first use, and certificate fingerprints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lambdasplit.errors import ConfigError
from lambdasplit.tls import KnownServers, certificate_fingerprint

app = typer.Typer(
    help="Servers trusted on first use (the known servers file, like SSH's known_hosts), and fingerprints.",
    no_args_is_help=True,
)
_out = Console(highlight=False)
_err = Console(stderr=True)

KnownServersFile = Annotated[
    Path | None,
    typer.Option(
        help="The known servers file (default: $LAMBDASPLIT_STATE/known_servers, else "
        "~/.local/state/lambdasplit/known_servers).",
        show_default=False,
    ),
]


@app.command("list")
def list_servers(known_servers: KnownServersFile = None) -> None:
    """Every server pinned on first use: HOST:PORT, its certificate's fingerprint, when it was first seen."""
    store = KnownServers(known_servers)
    entries = store.entries()
    if not entries:
        _err.print(f"no known servers in {store.path}")
        return
    for e in entries:
        _out.print(f"{escape(e.address)}  {e.fingerprint}  {e.first_seen}")


@app.command("forget")
def forget(
    address: Annotated[str, typer.Argument(help="HOST:PORT as `lambdasplit trust list` shows it.")],
    known_servers: KnownServersFile = None,
) -> None:
    """Forget a server, to accept its new certificate: the next connection trusts it on first use again.

    Do this only after the server's operator has confirmed the new fingerprint (`lambdasplit serve` prints it
    beside its URL), or pin it instead with `--tls-fingerprint`.
    """
    store = KnownServers(known_servers)
    if not store.forget(address.lower()):
        known = ", ".join(e.address for e in store.entries()) or "none"
        raise ConfigError(f"{address} is not in {store.path} (known: {known})")
    _err.print(f"forgot {escape(address)}; the next connection to it trusts its certificate on first use")


@app.command("fingerprint")
def fingerprint_command(
    cert: Annotated[Path, typer.Argument(help="A certificate (PEM), e.g. the server's --tls-cert.")],
) -> None:
    """Print a certificate's fingerprint, as devices pass it to --tls-fingerprint."""
    _out.print(certificate_fingerprint(cert))
