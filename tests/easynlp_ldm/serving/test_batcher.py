import threading
import time

import pytest

from easynlp_ldm.serving.batcher import Batcher, Cancelled, QueueFull, ShuttingDown


def test_compatible_jobs_share_a_batch_and_others_wait_their_turn():
    batches = []
    gate = threading.Event()

    def run(jobs, should_stop):
        gate.wait(5)
        batches.append([(j.key, j.payload) for j in jobs])
        return [j.payload * 10 for j in jobs]

    batcher = Batcher(run, max_batch_size=4, max_wait_ms=200, max_queue=16)
    jobs = [batcher.submit("a", 1), batcher.submit("b", 2), batcher.submit("a", 3), batcher.submit("a", 4, units=2)]
    gate.set()
    assert [j.future.result(5) for j in jobs] == [10, 20, 30, 40]
    assert batches[0] == [("a", 1), ("a", 3), ("a", 4)]
    assert batches[1] == [("b", 2)]
    batcher.close(5)


def test_one_failing_job_does_not_fail_its_neighbours():
    def run(jobs, should_stop):
        return [ValueError("bad prompt") if j.payload == "bad" else j.payload.upper() for j in jobs]

    batcher = Batcher(run, max_batch_size=8, max_wait_ms=50)
    good, bad = batcher.submit("k", "ok"), batcher.submit("k", "bad")
    assert good.future.result(5) == "OK"
    with pytest.raises(ValueError, match="bad prompt"):
        bad.future.result(5)
    batcher.close(5)


def test_queue_limit_cancel_and_close_finishes_queued_work():
    release = threading.Event()
    done, drops = [], {}

    def run(jobs, should_stop):
        release.wait(5)
        done.extend(j.payload for j in jobs)
        return [None for _ in jobs]

    batcher = Batcher(run, max_batch_size=1, max_wait_ms=0, max_queue=2,
                      on_drop=lambda stage, units: drops.__setitem__(stage, drops.get(stage, 0) + units))
    first = batcher.submit("k", 1)
    time.sleep(0.1)  # the worker holds job 1
    second, third = batcher.submit("k", 2), batcher.submit("k", 3)
    with pytest.raises(QueueFull):
        batcher.submit("k", 4)
    batcher.leave(third)  # its client went away; another job waits, so it is dropped without running
    release.set()
    assert first.future.result(5) is None and second.future.result(5) is None
    time.sleep(0.1)
    assert done == [1, 2] and third.future.cancelled() and drops == {"queued": 1}
    batcher.close(5)


def test_close_answers_queued_jobs_and_lets_the_running_batch_finish():
    release = threading.Event()

    def run(jobs, should_stop):
        release.wait(5)
        return [j.payload for j in jobs]

    batcher = Batcher(run, max_batch_size=1, max_wait_ms=0)
    running = batcher.submit("k", "running")
    time.sleep(0.1)
    queued = batcher.submit("k", "queued")
    closer = threading.Thread(target=batcher.close, args=(5,))
    closer.start()
    with pytest.raises(ShuttingDown):
        queued.future.result(2)
    with pytest.raises(ShuttingDown):
        batcher.submit("k", "late")
    release.set()
    closer.join(5)
    assert running.future.result(1) == "running"


def stepping_batcher(steps=200, **kwargs):
    """A batcher whose model takes ``steps`` steps of 10 ms, asking should_stop between steps."""
    log = {"steps": 0, "drops": {}}

    def run(jobs, should_stop):
        for _ in range(steps):
            if should_stop():
                raise Cancelled("stopped")
            time.sleep(0.01)
            log["steps"] += 1
        return [j.payload for j in jobs]

    def on_drop(stage, units):
        log["drops"][stage] = log["drops"].get(stage, 0) + units

    return Batcher(run, max_wait_ms=0, on_drop=on_drop, **kwargs), log


def test_an_orphaned_job_stops_between_steps_when_other_work_waits():
    batcher, log = stepping_batcher(max_batch_size=1, retry_grace_s=60)
    heavy = batcher.submit("k", "heavy")
    time.sleep(0.1)
    light = batcher.submit("other", "light")
    batcher.leave(heavy)
    start = time.monotonic()
    assert light.future.result(5) == "light"
    assert time.monotonic() - start < 2.0 + 0.5  # the light job's own 2 s, and at most a step of the heavy one
    with pytest.raises(Cancelled):
        heavy.future.result(1)
    assert log["drops"] == {"running": 1}
    batcher.close(5)


def test_an_orphan_runs_on_through_the_grace_and_an_identical_retry_adopts_it():
    batcher, log = stepping_batcher(steps=50, max_batch_size=1, retry_grace_s=0.3)
    first = batcher.submit("k", "image", share_key="same body")
    time.sleep(0.1)
    batcher.leave(first)  # the client timed out ...
    retry = batcher.submit("k", "image", share_key="same body")  # ... and sent the same request again
    assert retry is first and retry.future.result(5) == "image" and log["steps"] == 50
    assert log["drops"] == {"shared": 1}
    # with nobody coming back, the orphan stops once the grace has passed
    lonely = batcher.submit("k", "image", share_key="other body")
    time.sleep(0.05)
    batcher.leave(lonely)
    with pytest.raises(Cancelled):
        lonely.future.result(2)
    assert 50 + 20 < log["steps"] < 50 + 50
    batcher.close(5)


def test_a_job_with_waiters_is_shared_only_when_deterministic():
    batcher, log = stepping_batcher(steps=20, max_batch_size=1)
    seeded = batcher.submit("k", "a", share_key="seeded", share_always=True)
    same = batcher.submit("k", "a", share_key="seeded", share_always=True)
    unseeded = batcher.submit("k", "b", share_key="unseeded")
    another = batcher.submit("k", "b", share_key="unseeded")  # a second client: its own random images
    assert same is seeded and another is not unseeded
    assert [j.future.result(5) for j in (seeded, same, unseeded, another)] == ["a", "a", "b", "b"]
    batcher.close(5)
