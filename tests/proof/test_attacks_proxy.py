"""Forged client addresses (issue 17): our servers believe ``X-Forwarded-For`` only from a
configured trusted proxy (``WEBPURSE_TRUSTED_PROXIES``), and HAProxy, the trusted proxy,
replaces whatever a client sent. Rate limits (short codes, sign-in) count real clients.

Real processes: ``webpurse.listen.run_asgi`` serving a small app that echoes the client
address and scheme the server believes; loopback addresses 127.0.0.2/3 play other hosts;
the HAProxy case runs Debian's ``haproxy`` on a config from :mod:`webpurse.balancer`.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.proof.conftest import Proof
from webpurse.balancer import Backend, Layout, command, haproxy_path, write_config
from webpurse.balancer.tls import make_certificates
from webpurse.demo import free_port, wait_http, wait_port, webpurse_command
from webpurse.listen import ProxySettingError, proxy_options, trusted_proxies
from webpurse.merchant.till import ADDRESS_FAILURES

SUITE = "attacks_proxy"
ROOT = Path(__file__).resolve().parents[2]


def _need_haproxy() -> str:
    found = haproxy_path()
    if found is None:
        reason = "haproxy not installed (apt-get install haproxy)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return found


Start = Callable[[str | None], str]


@pytest.fixture
def echo_server() -> Iterator[Start]:
    """Start the echo app with ``WEBPURSE_TRUSTED_PROXIES`` set (or unset); its URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(proxies: str | None) -> str:
        env = dict(os.environ)
        env.pop("WEBPURSE_TRUSTED_PROXIES", None)
        env.pop("FORWARDED_ALLOW_IPS", None)
        if proxies is not None:
            env["WEBPURSE_TRUSTED_PROXIES"] = proxies
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.proof.proxy_echo", "127.0.0.1", str(port)],
            env=env,
            cwd=ROOT,
        )
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", process=process)
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def _seen(url: str, source: str, headers: dict[str, str]) -> dict[str, str]:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10.0) as client:
        answer = client.get(url + "/", headers=headers)
    answer.raise_for_status()
    seen: dict[str, str] = answer.json()
    return seen


FORGED = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https"}


def test_forged_header_from_untrusted_peer_is_ignored(echo_server: Start, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "X-Forwarded-For from a peer that is not a trusted proxy",
        expected="ignored: the client is the peer (127.0.0.2), scheme http",
    ) as row:
        url = echo_server("127.0.0.1")
        seen = _seen(url, "127.0.0.2", FORGED)
        assert seen == {"client": "127.0.0.2", "scheme": "http"}, seen
        row.observed = f"client {seen['client']}, scheme {seen['scheme']}"


def test_header_from_trusted_proxy_is_used(echo_server: Start, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "X-Forwarded-For from the configured trusted proxy",
        expected="used: the client is the address the proxy names, scheme https",
    ) as row:
        url = echo_server("127.0.0.1")
        seen = _seen(url, "127.0.0.1", FORGED)
        assert seen == {"client": "203.0.113.66", "scheme": "https"}, seen
        row.observed = f"client {seen['client']}, scheme {seen['scheme']}"


def test_no_trusted_proxy_configured_believes_nobody(echo_server: Start, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "X-Forwarded-For from 127.0.0.1 with no trusted proxy configured",
        expected="ignored (uvicorn alone would believe 127.0.0.1)",
    ) as row:
        url = echo_server(None)
        seen = _seen(url, "127.0.0.1", FORGED)
        assert seen == {"client": "127.0.0.1", "scheme": "http"}, seen
        row.observed = f"client {seen['client']}, scheme {seen['scheme']}"


def test_wildcard_and_garbage_are_refused(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "WEBPURSE_TRUSTED_PROXIES=* or a name",
        expected="refused with a clear error; networks and addresses accepted",
    ) as row:
        for bad in ("*", "proxy.example", "127.0.0.1, 10.0.0.0/40"):
            with pytest.raises(ProxySettingError, match="not an IP address"):
                trusted_proxies({"WEBPURSE_TRUSTED_PROXIES": bad})
        good = trusted_proxies({"WEBPURSE_TRUSTED_PROXIES": " 127.0.0.1 , 10.1.2.3/8,::1"})
        assert good == ("127.0.0.1", "10.0.0.0/8", "::1")
        assert proxy_options(()) == {"proxy_headers": False}
        row.observed = "3 bad values refused; " + ", ".join(good) + " accepted"


def test_client_forging_through_haproxy_is_replaced(
    echo_server: Start, tmp_path: Path, proof: Proof
) -> None:
    binary = _need_haproxy()
    with proof.row(
        SUITE,
        "a client sends X-Forwarded-For through HAProxy (TLS)",
        expected="HAProxy replaces it: the server sees the client's own address, https",
    ) as row:
        url = echo_server("127.0.0.1")
        port = int(url.rsplit(":", 1)[1])
        tls = make_certificates(tmp_path / "tls")
        layout = Layout(
            shop=[Backend("shop1", "127.0.0.1", port)],
            settlement=[Backend("settlement1", "127.0.0.1", port)],
            shop_port=free_port(),
            shop_internal_port=free_port(),
            settlement_port=free_port(),
        )
        config = write_config(tmp_path, layout, tls)
        assert command(config)[0] == binary
        haproxy = subprocess.Popen(command(config))
        try:
            wait_port("127.0.0.1", layout.shop_port, haproxy)
            verify = ssl.create_default_context(cafile=str(tls.ca))
            transport = httpx.HTTPTransport(local_address="127.0.0.3", verify=verify)
            with httpx.Client(transport=transport, timeout=10.0) as client:
                base = f"https://127.0.0.1:{layout.shop_port}"
                answer = client.get(base + "/", headers=FORGED)
                assert answer.status_code == 200, answer.text
                seen = answer.json()
            assert seen == {"client": "127.0.0.3", "scheme": "https"}, seen
            row.observed = f"client {seen['client']}, scheme {seen['scheme']}"
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=10)


def _csrf(page: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None, "the sign-in form has no CSRF token"
    return token.group(1)


def _signin(client: httpx.Client, base: str, name: str, forged: str) -> httpx.Response:
    page = client.get(f"{base}/staff/signin")
    assert page.status_code == 200, page.text
    return client.post(
        f"{base}/staff/signin",
        data={"name": name, "password": "wrong", "csrf": _csrf(page.text)},
        headers={"X-Forwarded-For": forged},
    )


def test_the_shops_signin_limiter_counts_each_client_behind_haproxy(
    tmp_path: Path, proof: Proof
) -> None:
    _need_haproxy()
    with proof.row(
        SUITE,
        "staff sign-in guessed through HAProxy, a new forged X-Forwarded-For each time",
        expected=f"429 after {ADDRESS_FAILURES} failures from that client; another client"
        " still gets 401; cookies Secure",
    ) as row:
        port = free_port()
        (tmp_path / "shop").mkdir()
        env = dict(os.environ)
        env.update(
            {
                "WEBPURSE_DATA_DIR": str(tmp_path / "shop"),
                "WEBPURSE_SETTLEMENT_URL": "http://127.0.0.1:9",  # not called here
                "WEBPURSE_SETTLEMENT_API_KEY": "sk_mer_unused",
                "WEBPURSE_MERCHANT_COOKIE_SECRET": "c" * 64,
                "WEBPURSE_TRUSTED_PROXIES": "127.0.0.1",
            }
        )
        env.pop("WEBPURSE_MERCHANT_DATABASE_URL", None)
        shop = subprocess.Popen(
            [*webpurse_command(), "serve", "merchant", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        haproxy: subprocess.Popen[bytes] | None = None
        try:
            wait_http(f"http://127.0.0.1:{port}/health", process=shop)
            tls = make_certificates(tmp_path / "tls")
            layout = Layout(
                shop=[Backend("shop1", "127.0.0.1", port)],
                settlement=[Backend("settlement1", "127.0.0.1", port)],
                shop_port=free_port(),
                shop_internal_port=free_port(),
                settlement_port=free_port(),
            )
            haproxy = subprocess.Popen(command(write_config(tmp_path, layout, tls)))
            wait_port("127.0.0.1", layout.shop_port, haproxy)
            base = f"https://127.0.0.1:{layout.shop_port}"
            verify = ssl.create_default_context(cafile=str(tls.ca))

            def client(source: str) -> httpx.Client:
                transport = httpx.HTTPTransport(local_address=source, verify=verify)
                return httpx.Client(transport=transport, timeout=30.0)

            with client("127.0.0.2") as guesser:
                codes = [
                    _signin(guesser, base, f"staff{i}", f"203.0.113.{i}").status_code
                    for i in range(ADDRESS_FAILURES + 1)
                ]
                jar = list(guesser.cookies.jar)
                secure = bool(jar) and all(cookie.secure for cookie in jar)
            with client("127.0.0.3") as other:
                other_code = _signin(other, base, "staff", "127.0.0.2").status_code
            assert codes == [401] * ADDRESS_FAILURES + [429], codes
            assert other_code == 401
            assert secure
            row.observed = (
                f"{codes.count(401)}×401 then {codes[-1]} for 127.0.0.2 (forged addresses"
                f" ignored); 127.0.0.3: {other_code}; cookies Secure"
            )
        finally:
            for process in (haproxy, shop):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=10)
