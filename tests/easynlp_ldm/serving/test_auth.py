import email.utils
import hashlib
import time

import pytest

from easynlp_ldm.serving.auth import check, eas_signature

BODY = b'{"text": "x"}'
NOW = 1_790_000_000.0


def signed(date_offset_s, token="tok", body=BODY):
    date = email.utils.formatdate(NOW + date_offset_s, usegmt=True)
    return {"date": date, "content-type": "application/json", "content-md5": hashlib.md5(body).hexdigest(),
            "authorization": eas_signature(token, body, "application/json", date, "/api/predict/svc")}


@pytest.mark.parametrize("offset,local_time,ok", [
    (0, False, True), (600, False, True), (1200, False, False), (8 * 3600, False, False),
    (8 * 3600, True, True), (5.5 * 3600 + 300, True, True), (-7 * 3600, True, True),
    (8 * 3600 + 20 * 60, True, True),  # within 900 s of UTC+8:15 (a quarter-hour offset)
    (15 * 3600 + 1000, True, False), (30 * 3600, True, False)])
def test_signed_date_within_the_skew_of_utc_or_a_time_zone(offset, local_time, ok):
    reason = check(signed(offset), BODY, "tok", "/api/predict/svc", max_skew_s=900, allow_local_time=local_time,
                   now=NOW)
    assert (reason is None) == ok, reason


def test_token_forms_and_their_refusals():
    assert check({"authorization": "tok"}, b"", "tok", "/") is None
    assert check({"authorization": "Bearer tok"}, b"", "tok", "/") is None
    assert "missing" in check({}, b"", "tok", "/")
    assert check({"authorization": "Bearer nope"}, b"", "tok", "/") == "wrong token"
    assert "signature" in check(signed(0, token="other"), BODY, "tok", "/api/predict/svc", now=NOW)
    assert "Content-MD5" in check(signed(0), b'{"text": "y"}', "tok", "/api/predict/svc", now=NOW)
    assert "signature" in check(signed(0), BODY, "tok", "/api/predict/another", now=NOW)
    assert "Date" in check({**signed(0), "date": "yesterday"}, BODY, "tok", "/api/predict/svc", now=time.time())
