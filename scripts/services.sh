#!/usr/bin/env bash
# Start the services the tests need that this machine does not start by itself:
# pcscd (with the vsmartcard vpcd driver). PostgreSQL is started when it is down.
set -euo pipefail

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi

if command -v pcscd >/dev/null; then
    if ! pgrep -x pcscd >/dev/null; then
        echo "starting pcscd"
        mkdir -p /run/pcscd
        pcscd
    fi
fi
