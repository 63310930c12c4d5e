"""The listening sockets our servers accept on, and running an ASGI app on them.

asyncio (Python 3.11) turns Nagle's algorithm off only on accepted sockets of a listener
made with ``IPPROTO_TCP``; a socket made with protocol 0 (what some uvicorn releases
bind) keeps Nagle on, which delays a response written in two parts (headers, then body)
by ~40 ms — the trap ``docs/performance.md`` describes. Whatever uvicorn does, every
server here listens on a socket made by :func:`tcp_listen_socket`, so the guarantee
"accepted connections have ``TCP_NODELAY``" is ours, not a library's.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Any

WORKER_START_SECONDS = 60
TRUSTED_PROXIES_ENV = "WEBPURSE_TRUSTED_PROXIES"


class ProxySettingError(ValueError):
    """``WEBPURSE_TRUSTED_PROXIES`` names something that is not an address or network."""


def trusted_proxies(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The proxies whose ``X-Forwarded-For``/``-Proto`` our servers believe.

    ``WEBPURSE_TRUSTED_PROXIES``: comma-separated addresses or networks (``127.0.0.1``,
    ``10.0.0.0/8``). Unset or empty: none, and the headers are ignored: the client's
    address is the connection's peer. A wildcard is refused: it would let any client
    choose the address that rate limits count.
    """
    raw = (os.environ if env is None else env).get(TRUSTED_PROXIES_ENV, "")
    found: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            if "/" in item:
                item = str(ipaddress.ip_network(item, strict=False))
            else:
                item = str(ipaddress.ip_address(item))
        except ValueError:
            raise ProxySettingError(
                f"{TRUSTED_PROXIES_ENV}: {item!r} is not an IP address or network"
                " (a wildcard is not allowed)"
            ) from None
        found.append(item)
    return tuple(found)


def proxy_options(proxies: tuple[str, ...]) -> dict[str, Any]:
    """uvicorn's options for ``proxies``. uvicorn's own default believes the headers from
    127.0.0.1, so any local process could forge a client's address: always explicit."""
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(proxies)}


def tcp_listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``IPPROTO_TCP``, so accepted connections get ``TCP_NODELAY``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_asgi(app: Any, *, host: str, port: int, workers: int = 1, **options: Any) -> None:
    """Serve ``app`` (an ASGI app, or an import string) on our own listening socket.

    ``workers`` > 1 needs an import string (each worker process imports its own app) and
    runs uvicorn's process supervisor over the one inherited socket. The supervisor kills
    and respawns a worker that does not answer its health ping in time; its 5 s default
    is shorter than a worker's start-up (importing and building the app) on a busy
    2-core machine, which then restarts workers forever and never serves. A worker gets
    ``WORKER_START_SECONDS`` instead.

    The client's address comes from ``X-Forwarded-For`` only when the peer is one of
    :func:`trusted_proxies` (``WEBPURSE_TRUSTED_PROXIES``), unless ``options`` say
    otherwise.
    """
    import uvicorn

    if "proxy_headers" not in options and "forwarded_allow_ips" not in options:
        options.update(proxy_options(trusted_proxies()))
    sock = tcp_listen_socket(host, port)
    if workers > 1:
        options.setdefault("timeout_worker_healthcheck", WORKER_START_SECONDS)
    config = uvicorn.Config(app, host=host, port=port, workers=workers, **options)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
