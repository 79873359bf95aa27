"""Who may call the service: the three ways EAS clients send a token.

* ``Authorization: <token>`` — EAS's curl examples and the SDK with ``custom_url``;
* ``Authorization: Bearer <token>`` — OpenAI clients and most HTTP tools;
* ``Authorization: EAS <signature>`` — the official ``eas-prediction`` SDK with a token set: base64 of
  HMAC-SHA1(token, "POST\\n<Content-MD5>\\n<Content-Type>\\n<Date>\\n/api/predict/<service>"), where Content-MD5 is the
  hex MD5 of the body (checked against the body here) and Date an RFC 1123 time.

A signed request whose Date is further than ``max_skew_s`` from the server's clock is refused. The SDK stamps the
client's *local* time and labels it GMT, so a client east or west of UTC is off by its UTC offset; with
``allow_local_time`` (the default) the Date may also be off by a whole-quarter-hour offset between UTC−12 and UTC+14,
within ``max_skew_s`` of it. Turn it off when every client runs in UTC.

Since a Date is thus good for about a day, the Date alone is no replay guard: ``ReplayCache`` remembers each signature
served until its Date would be refused anyway, and the same signature again is refused. A signature identifies the
request (body, content type, Date to the second, service), so two identical signed requests within one second are
one request to the server. A signature is served once: one whose request was answered with anything but 200 may
come again (the SDK retries a 5xx at once, with the same Date).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import logging
import threading
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

logger = logging.getLogger("easynlp.serve")

QUARTER_HOUR = 900
OFFSETS = range(-12 * 4, 14 * 4 + 1)  # UTC offsets in quarter hours
REPLAY_CACHE_ENTRIES = 100_000  # signatures remembered at most (≈ 20 MB)


def eas_signature(token: str, body: bytes, content_type: str, date: str, resource: str) -> str:
    """The ``Authorization`` value the EAS SDK sends for ``body`` (``resource`` = ``/api/predict/<service>``)."""
    content_md5 = hashlib.md5(body).hexdigest()
    message = f"POST\n{content_md5}\n{content_type}\n{date}\n{resource}".strip()
    digest = hmac.new(token.encode(), message.encode(), hashlib.sha1).digest()
    return "EAS " + base64.b64encode(digest).decode()


def _stamp(date: str) -> float | None:
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _date_ok(date: str, max_skew_s: float, allow_local_time: bool, now: float) -> bool:
    stamp = _stamp(date)
    if stamp is None:
        return False
    offsets = OFFSETS if allow_local_time else (0,)
    return any(abs(stamp - now - k * QUARTER_HOUR) <= max_skew_s for k in offsets)


def accepted_until(date: str, max_skew_s: float, allow_local_time: bool) -> float:
    """The last server time (``time.time()``) at which a signed request with this Date passes ``check``."""
    behind = -min(OFFSETS) * QUARTER_HOUR if allow_local_time else 0  # a client at UTC−12 stamps 12 h behind
    return (_stamp(date) or 0.0) + behind + max_skew_s


class ReplayCache:
    """The signatures served, each remembered until ``until`` (when its Date stops being accepted), at most
    ``max_entries`` of them: past that the one that expires soonest is forgotten first (logged), so memory stays
    bounded whatever the traffic. Only requests whose signature checked out get here: only token holders fill it."""

    def __init__(self, max_entries: int = REPLAY_CACHE_ENTRIES):
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap; released claims stay in it until they expire
        self._lock = threading.Lock()
        self._warned = False

    def __len__(self) -> int:
        """Entries held (released ones included until they expire or are pushed out)."""
        return len(self._expiry)

    def _pop(self) -> tuple[float, str]:
        until, signature = heapq.heappop(self._expiry)
        if self._until.get(signature) == until:
            del self._until[signature]
        return until, signature

    def claim(self, signature: str, until: float, now: float | None = None) -> bool:
        """True when ``signature`` is new (now remembered); False for a replay."""
        now = time.time() if now is None else now
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._pop()
            if signature in self._until:
                return False
            self._until[signature] = until
            heapq.heappush(self._expiry, (until, signature))
            while len(self._expiry) > self.max_entries:
                forgotten, _ = self._pop()
                if not self._warned and forgotten >= now:
                    self._warned = True
                    logger.warning("replay cache full (%d signed requests within their Date's window): the ones "
                                   "expiring soonest are forgotten early", self.max_entries)
            return True

    def release(self, signature: str) -> None:
        """The request was not served (answered with anything but 200): its signature may come again."""
        with self._lock:
            self._until.pop(signature, None)


def check(headers: Mapping[str, str], body: bytes, token: str, resource: str, *, max_skew_s: float = 900,
          allow_local_time: bool = True, now: float | None = None) -> str | None:
    """None when the request carries ``token`` in one of the accepted forms, else why not (one line).

    ``headers`` are looked up in lower case; ``resource`` is the path the SDK signed: ``/api/predict/<service>``."""
    given = headers.get("authorization", "").strip()
    if not given:
        return "missing Authorization header: send the service token (Authorization: <token>, Bearer <token>, or " \
               "the EAS SDK's signature)"
    scheme, _, rest = given.partition(" ")
    if scheme.lower() == "bearer":
        given = rest.strip()
    elif scheme == "EAS" and rest:
        date = headers.get("date", "")
        if not _date_ok(date, max_skew_s, allow_local_time, time.time() if now is None else now):
            return f"the signed request's Date header {date!r} is missing or further than {max_skew_s:g} s from " \
                   "the server's clock"
        if headers.get("content-md5", "") != hashlib.md5(body).hexdigest():
            return "the Content-MD5 header does not match the body"
        expected = eas_signature(token, body, headers.get("content-type", ""), date, resource)
        return None if hmac.compare_digest(given.encode(), expected.encode()) else "wrong EAS signature for this token"
    return None if hmac.compare_digest(given.encode(), token.encode()) else "wrong token"
