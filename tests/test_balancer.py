"""webpurse.balancer: the generated haproxy.cfg and the demo's certificates (issue 17)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from webpurse.balancer import (
    Backend,
    BalancerError,
    Layout,
    haproxy_path,
    render_config,
    write_config,
)
from webpurse.balancer.tls import make_certificates

LAYOUT = Layout(
    shop=[Backend("shop1", "127.0.0.1", 9001), Backend("shop2", "127.0.0.1", 9002)],
    settlement=[Backend("settlement1", "127.0.0.1", 9101)],
    shop_port=8443,
    shop_internal_port=8080,
    settlement_port=8444,
)


def test_config_balances_checks_and_ends_tls(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path)
    text = render_config(LAYOUT, tls)
    assert f"bind 127.0.0.1:8443 ssl crt {tls.bundle}" in text
    assert "    server shop1 127.0.0.1:9001 check" in text
    assert "    server shop2 127.0.0.1:9002 check" in text
    assert "    server settlement1 127.0.0.1:9101 check" in text
    assert text.count("option httpchk GET /health") == 2
    assert text.count("balance roundrobin") == 2
    assert "timeout tunnel 1h" in text
    assert "http-request set-header X-Forwarded-For %[src]" in text
    assert "$" not in text


@pytest.mark.parametrize(
    "change",
    [
        {"shop": []},
        {"settlement": []},
        {"shop_balance": "random-ish"},
        {"shop": [Backend("shop 1", "127.0.0.1", 9001)]},
        {"shop": [Backend("shop1", "127.0.0.1", 0)]},
        {"host": "127.0.0.1\n    bind 0.0.0.0:80"},
    ],
)
def test_bad_layout_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    tls = make_certificates(tmp_path)
    with pytest.raises(BalancerError):
        render_config(dataclasses.replace(LAYOUT, **change), tls)  # type: ignore[arg-type]


def test_certificates_chain_to_the_ca_and_the_key_is_private(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path, hosts=("localhost", "127.0.0.1"))
    assert stat.S_IMODE(os.stat(tls.bundle).st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(tls.bundle.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # A TLS handshake in memory: a client trusting only the CA (with strict X.509
    # checks, as Python 3.13 sets by default) accepts the server for 127.0.0.1.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls.bundle)
    client_context = ssl.create_default_context(cafile=str(tls.ca))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(to_server.read())
        to_client.write(server_out.read())
    assert client.version() is not None and server.version() is not None
    with pytest.raises(ValueError, match="at least one"):
        make_certificates(tmp_path / "none", hosts=())


def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    binary = haproxy_path()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and haproxy is not installed")
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    path = write_config(tmp_path, LAYOUT, make_certificates(tmp_path))
    checked = subprocess.run(
        [binary, "-c", "-f", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
