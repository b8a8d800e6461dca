"""Where the Triton servers are: the `triton_url` setting parsed into targets (no gRPC imported here).

`triton_url` is one target or several separated by commas:

    host:port                 one server (a name is resolved by gRPC itself: one connection)
    [v6addr]:port             one server at an IPv6 address
    dns:///name:port          every address `name` resolves to, one server each, resolved again
                              periodically (a Kubernetes headless Service gives one A record per pod)
"""
from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass

DNS_PREFIX = "dns:///"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Target:
    """One entry of `triton_url`: a fixed server, or a DNS name standing for several."""

    host: str
    port: int
    dns: bool = False

    @property
    def text(self) -> str:
        """The entry as written in `triton_url` (normalised)."""
        return f"{DNS_PREFIX if self.dns else ''}{self.host}:{self.port}"


def parse_targets(value: str) -> list[Target]:
    """The targets of a `triton_url` value (comma-separated; blanks around commas ignored).

    Raises:
        ValueError: an entry is not `host:port`, `[v6]:port` or `dns:///name:port`, or none is given.
    """
    targets: list[Target] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        dns = entry.startswith(DNS_PREFIX)
        rest = entry[len(DNS_PREFIX):] if dns else entry
        match = _HOST_PORT.match(rest)
        port = int(match["port"]) if match else 0
        if match is None or not 0 < port < 65536 or (dns and rest.startswith("[")):
            raise ValueError(f"Triton target {entry!r} is not host:port, [ipv6]:port or dns:///name:port")
        target = Target(match["host"], port, dns)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise ValueError("triton_url names no Triton server (expected host:port[,host:port...] or dns:///name:port)")
    return targets


def normalise(value: str | list[str] | tuple[str, ...]) -> str:
    """`triton_url` as one comma-separated string of valid targets (a list is joined)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    return ",".join(target.text for target in parse_targets(value))


def address(host: str, port: int) -> str:
    """A gRPC target for one address (`[v6]:port` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def resolve(target: Target) -> list[str]:
    """The server addresses of a target: itself when fixed, every resolved address (sorted) for `dns:///`.

    Raises:
        OSError: the name does not resolve (`socket.gaierror`).
    """
    if not target.dns:
        return [target.text]
    infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    return sorted({address(str(info[4][0]), target.port) for info in infos})
