import threading
import time

import pytest

from easynlp_ldm.serving.batcher import Batcher, QueueFull


def test_compatible_jobs_share_a_batch_and_others_wait_their_turn():
    batches = []
    gate = threading.Event()

    def run(jobs):
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
    def run(jobs):
        return [ValueError("bad prompt") if j.payload == "bad" else j.payload.upper() for j in jobs]

    batcher = Batcher(run, max_batch_size=8, max_wait_ms=50)
    good, bad = batcher.submit("k", "ok"), batcher.submit("k", "bad")
    assert good.future.result(5) == "OK"
    with pytest.raises(ValueError, match="bad prompt"):
        bad.future.result(5)
    batcher.close(5)


def test_queue_limit_cancel_and_close_finishes_queued_work():
    release = threading.Event()
    done = []

    def run(jobs):
        release.wait(5)
        done.extend(j.payload for j in jobs)
        return [None for _ in jobs]

    batcher = Batcher(run, max_batch_size=1, max_wait_ms=0, max_queue=2)
    first = batcher.submit("k", 1)
    time.sleep(0.1)  # the worker holds job 1
    second, third = batcher.submit("k", 2), batcher.submit("k", 3)
    with pytest.raises(QueueFull):
        batcher.submit("k", 4)
    assert batcher.cancel(third) and third.future.cancelled()
    release.set()
    batcher.close(5)
    assert done == [1, 2] and first.future.done() and second.future.done()
