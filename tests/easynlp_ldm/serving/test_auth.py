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


@pytest.mark.parametrize("local_time", [False, True])
def test_a_signature_is_remembered_exactly_as_long_as_its_date_is_accepted(local_time):
    from easynlp_ldm.serving.auth import accepted_until

    for offset in (0, -7 * 3600, 8 * 3600, 14 * 3600):
        headers = signed(offset)
        if check(headers, BODY, "tok", "/api/predict/svc", allow_local_time=local_time, now=NOW) is not None:
            continue  # a Date this setting refuses in the first place
        until = accepted_until(headers["date"], 900, local_time)
        assert check(headers, BODY, "tok", "/api/predict/svc", allow_local_time=local_time, now=until) is None
        assert check(headers, BODY, "tok", "/api/predict/svc", allow_local_time=local_time, now=until + 1) is not None
    assert accepted_until(signed(0)["date"], 900, True) - NOW > 12 * 3600  # why a replay needs remembering


def test_the_replay_cache_serves_a_signature_once_until_released_or_expired():
    from easynlp_ldm.serving.auth import ReplayCache

    cache = ReplayCache(max_entries=10)
    assert cache.claim("EAS a", until=NOW + 60, now=NOW)
    assert not cache.claim("EAS a", until=NOW + 60, now=NOW + 30)  # a replay
    cache.release("EAS a")  # its request was not served (a 5xx): the client may send it again
    assert cache.claim("EAS a", until=NOW + 60, now=NOW + 31)
    assert cache.claim("EAS a", until=NOW + 200, now=NOW + 61)  # its Date had expired: it is a new claim
    assert len(cache) == 1


def test_the_replay_cache_is_bounded_and_forgets_what_expires_soonest_first():
    from easynlp_ldm.serving.auth import ReplayCache

    cache = ReplayCache(max_entries=100)
    for i in range(1000):  # each new claim expires sooner than the ones before
        assert cache.claim(f"EAS {i}", until=NOW + 10_000 - i, now=NOW)
        assert len(cache) <= 100
    assert not any(cache.claim(f"EAS {i}", until=NOW + 10_000 - i, now=NOW) for i in range(100))
    cache = ReplayCache(max_entries=100)
    for i in range(100):
        cache.claim(f"EAS {i}", until=NOW + 10_000 + i, now=NOW)
    assert cache.claim("EAS new", until=NOW + 20_000, now=NOW)
    assert cache.claim("EAS 0", until=NOW + 10_000, now=NOW)  # the one expiring soonest was forgotten
    assert not cache.claim("EAS 99", until=NOW + 10_099, now=NOW)  # the others are still refused
    # released and expired claims leave nothing behind
    cache = ReplayCache(max_entries=100)
    for i in range(1000):
        cache.claim(f"EAS short {i}", until=NOW + i, now=NOW + i - 1)
        cache.release(f"EAS short {i}")
    assert len(cache) <= 2
