"""Our listening sockets: TCP (so accepted connections get TCP_NODELAY), SO_REUSEPORT on request."""

from __future__ import annotations

import socket

import pytest

from webpurse.listen import run_asgi, tcp_listen_socket


def test_sockets_that_ask_for_it_share_a_port_and_others_cannot() -> None:
    first = tcp_listen_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    second = tcp_listen_socket("127.0.0.1", port, reuse_port=True)
    try:
        first.listen()
        second.listen()
        assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert first.proto == socket.IPPROTO_TCP
        with pytest.raises(OSError):
            tcp_listen_socket("127.0.0.1", port).listen()  # no SO_REUSEPORT: refused
    finally:
        first.close()
        second.close()


def test_a_plain_socket_does_not_reuse_the_port() -> None:
    sock = tcp_listen_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        sock.close()


def test_workers_need_an_import_string() -> None:
    with pytest.raises(TypeError, match="import string"):
        run_asgi(object(), host="127.0.0.1", port=0, workers=2)
