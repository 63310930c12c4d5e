"""How many wrong short codes a client network may try (:class:`CodeLimiter`)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections import OrderedDict

from webpurse.reader.remote.pairing import PAIRING_LIFETIME, Clock, utc_now

log = logging.getLogger(__name__)

CODE_ATTEMPTS = 10
"""Failed code pairings allowed per client address per :data:`PAIRING_LIFETIME`."""
CODE_SITE_ATTEMPTS = 100
"""Failed code pairings allowed per IPv6 /48 (all its /64s together) per window."""
CODE_GUESS_BUDGET = 100_000
"""Wrong codes the hub may see (from anyone) while one pairing is open before that
pairing's code is retired: each code is one of 30⁸, so its chance of being guessed stays
below 2 × 10⁻⁷ however many networks guess (the token and link still work)."""
CODE_CLIENTS = 10_000
"""Client networks with recent wrong codes the hub remembers at most (see :class:`CodeLimiter`)."""


def client_network(host: str) -> tuple[str, str]:
    """The networks a client's wrong codes count against: (its own, the wider one).

    An IPv6 client owns its whole /64 (any host can take any address in it), so the /64 is
    the client; the /48 around it (one site's allocation) is the wider network. An IPv4
    address is the client and its own wider network (addresses are scarce). Anything else
    (a test client's name) is itself.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host, host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return str(address), str(address)
    narrow = ipaddress.IPv6Network((address, 64), strict=False)
    wide = ipaddress.IPv6Network((address, 48), strict=False)
    return str(narrow), str(wide)


class CodeLimiter:
    """Bounds wrong short-code guesses per client network: at most ``attempts`` within
    ``window`` per IPv4 address or IPv6 /64 (an 8-character code is guessable by brute
    force), and ``wide_attempts`` per IPv6 /48.

    Memory is bounded too: a network's failures are forgotten once the newest is older
    than ``window`` (swept on every call, oldest first), and at most ``max_clients``
    networks are remembered. A /64 is one entry however many addresses it uses, and a /48
    stops being let in (and so stops adding /64 entries) after ``wide_attempts``, so filling
    the table takes ``max_clients / wide_attempts`` separate /48 sites. When it is full, a
    network it does not hold may still try (it is not remembered): the table filling must
    not lock every shopper out. What bounds guessing then is per pairing: every wrong code
    counts in :attr:`wrong_codes`, and a pairing's code is retired once the hub has seen
    :data:`CODE_GUESS_BUDGET` wrong codes since it was issued (``ReaderHub``).
    """

    def __init__(
        self,
        *,
        clock: Clock = utc_now,
        window: dt.timedelta = PAIRING_LIFETIME,
        attempts: int = CODE_ATTEMPTS,
        wide_attempts: int = CODE_SITE_ATTEMPTS,
        max_clients: int = CODE_CLIENTS,
    ) -> None:
        self._clock = clock
        self._window = window
        self._attempts = attempts
        self._wide_attempts = wide_attempts
        self._max_clients = max_clients
        # network → its failure times within the window; ordered by newest failure, oldest first
        self._failures: OrderedDict[str, list[dt.datetime]] = OrderedDict()
        self._wide: OrderedDict[str, list[dt.datetime]] = OrderedDict()
        self.wrong_codes = 0  # every wrong code ever, remembered or not

    def __len__(self) -> int:
        """Client networks remembered now."""
        return len(self._failures)

    def _sweep(self, table: OrderedDict[str, list[dt.datetime]], since: dt.datetime) -> None:
        while table:
            key, times = next(iter(table.items()))
            if times[-1] > since:
                break
            del table[key]

    def _recent(
        self, table: OrderedDict[str, list[dt.datetime]], key: str, since: dt.datetime
    ) -> int | None:
        times = table.get(key)
        if times is None:
            return None
        recent = [t for t in times if t > since]
        if not recent:  # only if the clock went back: stale behind a fresher entry
            del table[key]
            return None
        table[key] = recent  # order unchanged: its newest failure is the same
        return len(recent)

    def allows(self, client: str) -> bool:
        """May ``client`` (its address) try a code now?"""
        since = self._clock() - self._window
        self._sweep(self._failures, since)
        self._sweep(self._wide, since)
        narrow, wide = client_network(client)
        if narrow != wide and (self._recent(self._wide, wide, since) or 0) >= self._wide_attempts:
            return False
        count = self._recent(self._failures, narrow, since)
        if count is None:
            if len(self._failures) >= self._max_clients:
                log.warning("code limiter full (%d networks): %s not remembered", len(self), narrow)
            return True
        return count < self._attempts

    def _record(self, table: OrderedDict[str, list[dt.datetime]], key: str, keep: int) -> None:
        now = self._clock()
        times = table.pop(key, None)
        if times is None and len(table) >= self._max_clients:
            return  # full: ``allows`` refuses this network anyway
        recent = [t for t in times or () if t > now - self._window]
        recent.append(now)
        table[key] = recent[-keep:]  # newest failure: to the end

    def failed(self, client: str) -> None:
        """``client`` (its address) tried a wrong code."""
        self.wrong_codes += 1
        since = self._clock() - self._window
        self._sweep(self._failures, since)
        self._sweep(self._wide, since)
        narrow, wide = client_network(client)
        self._record(self._failures, narrow, self._attempts)
        if narrow != wide:
            self._record(self._wide, wide, self._wide_attempts)
