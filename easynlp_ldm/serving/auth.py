"""Who may call the service: the three ways EAS clients send a token.

* ``Authorization: <token>`` — EAS's curl examples and the SDK with ``custom_url``;
* ``Authorization: Bearer <token>`` — OpenAI clients and most HTTP tools;
* ``Authorization: EAS <signature>`` — the official ``eas-prediction`` SDK with a token set: base64 of
  HMAC-SHA1(token, "POST\\n<Content-MD5>\\n<Content-Type>\\n<Date>\\n/api/predict/<service>"), where Content-MD5 is the
  hex MD5 of the body (checked against the body here) and Date an RFC 1123 time.

A signed request whose Date is further than ``max_skew_s`` from the server's clock is refused (a replay guard). The SDK
stamps the client's *local* time and labels it GMT, so a client east or west of UTC is off by its UTC offset; with
``allow_local_time`` (the default) the Date may also be off by a whole-quarter-hour offset between UTC−12 and UTC+14,
within ``max_skew_s`` of it. Turn it off when every client runs in UTC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

QUARTER_HOUR = 900
OFFSETS = range(-12 * 4, 14 * 4 + 1)  # UTC offsets in quarter hours


def eas_signature(token: str, body: bytes, content_type: str, date: str, resource: str) -> str:
    """The ``Authorization`` value the EAS SDK sends for ``body`` (``resource`` = ``/api/predict/<service>``)."""
    content_md5 = hashlib.md5(body).hexdigest()
    message = f"POST\n{content_md5}\n{content_type}\n{date}\n{resource}".strip()
    digest = hmac.new(token.encode(), message.encode(), hashlib.sha1).digest()
    return "EAS " + base64.b64encode(digest).decode()


def _date_ok(date: str, max_skew_s: float, allow_local_time: bool, now: float) -> bool:
    try:
        stamp = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    offsets = OFFSETS if allow_local_time else (0,)
    return any(abs(stamp - now - k * QUARTER_HOUR) <= max_skew_s for k in offsets)


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
