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

# Redis on 127.0.0.1:6379 for the shop's shared-state tests (WEBPURSE_REDIS_URL); the
# Redis-outage test starts a redis-server of its own on a free port.
if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null
fi

# pcscd with the vsmartcard vpcd driver (docs/pcsc.md). No systemd in a container: run the
# daemon itself (it forks into the background and stays; no --auto-exit). It reads
# /etc/reader.conf.d/ only at start, so a pcscd started before vsmartcard-vpcd was
# installed (e.g. by apt) is restarted.
pcsc_has_vpcd() {
    local readers
    readers=$(timeout 10 pcsc_scan -r 2>/dev/null || timeout 10 opensc-tool -l 2>/dev/null || true)
    [[ $readers == *"Virtual PCD"* ]]
}
if command -v pcscd >/dev/null; then
    mkdir -p /run/pcscd
    if pgrep -x pcscd >/dev/null && [ -f /etc/reader.conf.d/vpcd ] \
        && ! pcsc_has_vpcd; then
        echo "restarting pcscd to load the vpcd driver"
        for pid in $(pgrep -x pcscd); do kill "$pid" || true; done
        for _ in $(seq 1 50); do pgrep -x pcscd >/dev/null || break; sleep 0.2; done
    fi
    if ! pgrep -x pcscd >/dev/null; then
        echo "starting pcscd"
        rm -f /run/pcscd/pcscd.comm /run/pcscd/pcscd.pid  # stale after a crash
        pcscd
        for _ in $(seq 1 50); do pcsc_has_vpcd && break; sleep 0.2; done
    fi
    pcsc_has_vpcd || echo "warning: pcscd shows no vpcd reader" >&2
fi
