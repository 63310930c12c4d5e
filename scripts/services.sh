#!/usr/bin/env bash
# Start the services the tests need that this machine does not start by itself:
# pcscd (with the vsmartcard vpcd driver). PostgreSQL is started when it is down.
set -euo pipefail

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
# The settlement tests use database `test` (WEBPURSE_TEST_POSTGRES_URL); create it if absent.
for _ in $(seq 1 50); do pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && break; sleep 0.2; done
# On a throwaway CI machine, let the tests connect over TCP as postgres without a password.
if [ "${CI:-}" = "true" ] && pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null \
    && ! psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        [ -f "$hba" ] || continue
        echo "allowing trust auth on loopback in $hba (CI only)"
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    done
    runuser -u postgres -- psql -tAc 'SELECT pg_reload_conf()' >/dev/null || true
fi
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null \
    && ! psql -h 127.0.0.1 -U postgres -d test -tAc 'SELECT 1' >/dev/null 2>&1; then
    echo "creating database test"
    runuser -u postgres -- createdb test 2>/dev/null \
        || createdb -h 127.0.0.1 -U postgres test || true
fi

if command -v pcscd >/dev/null; then
    if ! pgrep -x pcscd >/dev/null; then
        echo "starting pcscd"
        mkdir -p /run/pcscd
        pcscd
    fi
fi
