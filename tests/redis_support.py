"""Real Redis for the shop's shared-state tests.

- :func:`redis_url` is the Redis at ``WEBPURSE_TEST_REDIS_URL`` (default
  ``redis://127.0.0.1:6379/0``): the test skips when it cannot be reached, unless
  ``CI=true``, where it fails;
- :func:`unique_prefix` gives each test its own key prefix (no collisions between tests
  or between branches sharing the machine's Redis), and :func:`drop_prefix` removes its keys;
- :class:`OwnRedis` is a ``redis-server`` of the test's own on a free loopback port, that
  the test can kill (SIGKILL) and start again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT = 10.0


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def redis_url() -> str:
    url = os.environ.get("WEBPURSE_TEST_REDIS_URL", DEFAULT_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
        reachable = True
    except (redis.RedisError, OSError):
        reachable = False
    finally:
        client.close()
    _need(reachable, f"no Redis at {url} (set WEBPURSE_TEST_REDIS_URL)")
    return url


def unique_prefix(name: str) -> str:
    return f"test-i17:{name}:{secrets.token_hex(4)}"


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """``redis-server`` on a free loopback port, no persistence; :meth:`kill` is SIGKILL."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("redis-server")
        _need(exe is not None, "redis-server is not installed (Debian package redis-server)")
        assert exe is not None
        self.exe = exe
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:  # bounded polling for readiness
                try:
                    client.ping()
                    return
                except (redis.RedisError, OSError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
