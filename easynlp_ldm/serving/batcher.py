"""Dynamic batching: concurrent requests with the same batch key share one model call; abandoned work is dropped.

One worker thread owns the model. It takes the oldest queued job, then gathers queued jobs with the same key (in
arrival order) until ``max_batch_size`` work units are collected or ``max_wait_ms`` has passed since the first job
arrived, runs them together and resolves each job's future with its own result or its own exception — one bad
request never fails its neighbours. Jobs with other keys stay queued, in order.

Each job counts its *waiters* (the clients waiting for it). A waiter that disconnects or times out ``leave``s; a job
nobody waits for is *orphaned*. An orphan is dropped — taken off the queue, or its batch stopped between sampler steps
when every member of the batch is an orphan (``should_stop``) — as soon as other work is queued or ``retry_grace_s``
has passed, whichever is first. Within that grace an identical request (``share_key``) adopts it: a client that
timed out and sent the same request again (the EAS SDK retries after its 5 s timeout) gets the work already under
way instead of starting it over. Requests whose result does not depend on chance (an explicit seed) may also share a
job that others still wait for (``share_always``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class ShuttingDown(Exception):
    """The service is stopping: queued work is answered, not run."""


class Cancelled(Exception):
    """Nobody waits for this job any more; its work was stopped."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    units: int  # how much of a batch it takes (images)
    share_key: Hashable | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    waiters: int = 1
    orphaned_at: float | None = None


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job], Callable[[], bool]], list[Any]], *, max_batch_size: int = 8,
                 max_wait_ms: float = 50.0, max_queue: int = 64, retry_grace_s: float = 1.0,
                 on_batch: Callable[[int], None] | None = None, on_drop: Callable[[str, int], None] | None = None):
        """``run_batch(jobs, should_stop)`` returns a result or an exception per job; it should call
        ``should_stop()`` between steps and raise ``Cancelled`` when it says True. ``on_drop(stage, units)`` counts
        dropped work: stage "queued" (never started), "running" (stopped part-way), "unclaimed" (finished for
        nobody), "shared" (a request that joined a job under way instead of adding one)."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.retry_grace = retry_grace_s
        self.on_batch = on_batch
        self.on_drop = on_drop or (lambda stage, units: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._shared: dict[Hashable, Job] = {}
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="easynlp-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, key: Hashable, payload: Any, units: int = 1, share_key: Hashable | None = None,
               share_always: bool = False) -> Job:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            job = self._shared.get(share_key) if share_key is not None else None
            if job is not None and not job.future.done() and (share_always or job.waiters == 0):
                job.waiters += 1
                job.orphaned_at = None
                self.on_drop("shared", job.units)
                return job
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests queued")
            job = Job(key, payload, max(1, units), share_key)
            self._queue.append(job)
            if share_key is not None:
                self._shared[share_key] = job
            self._cond.notify_all()
        return job

    def waited_for(self, share_key: Hashable) -> bool:
        """Whether a job with this ``share_key`` is in flight and somebody still waits for it."""
        with self._cond:
            job = self._shared.get(share_key)
            return job is not None and not job.future.done() and job.waiters > 0

    def leave(self, job: Job) -> None:
        """A waiter of ``job`` has gone (disconnected, timed out); the job is orphaned when it was the last."""
        with self._cond:
            job.waiters = max(0, job.waiters - 1)
            if job.waiters == 0 and job.orphaned_at is None:
                job.orphaned_at = time.monotonic()
            self._cond.notify_all()

    def started(self, job: Job) -> bool:
        with self._cond:
            return job in self._running or job.future.done()

    # ---------------------------------------------------------------------------------------------- the worker
    def _abandoned(self, job: Job, now: float) -> bool:
        """Called with the lock held."""
        if job.waiters > 0 or job.orphaned_at is None:
            return False
        others_waiting = any(other.waiters > 0 for other in self._queue)
        return others_waiting or now - job.orphaned_at >= self.retry_grace

    def should_stop(self) -> bool:
        """True when every job of the running batch is abandoned."""
        with self._cond:
            now = time.monotonic()
            return bool(self._running) and all(self._abandoned(job, now) for job in self._running)

    def _forget(self, job: Job) -> None:
        if job.share_key is not None and self._shared.get(job.share_key) is job:
            del self._shared[job.share_key]

    def _purge(self) -> None:
        """Drop abandoned queued jobs (with the lock held)."""
        now = time.monotonic()
        for job in [j for j in self._queue if self._abandoned(j, now)]:
            self._queue.remove(job)
            self._forget(job)
            job.future.cancel()
            self.on_drop("queued", job.units)

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while True:
                self._purge()
                if self._queue or self._stopping:
                    break
                self._cond.wait()
            if not self._queue:
                return []
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while True:
                units = sum(j.units for j in self._queue if j.key == first.key)
                remaining = deadline - time.monotonic()
                if units >= self.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(timeout=remaining)
            batch, used = [], 0
            for job in list(self._queue):
                if job.key != first.key:
                    continue
                if batch and used + job.units > self.max_batch_size:
                    break
                batch.append(job)
                used += job.units
            for job in batch:
                self._queue.remove(job)
            self._running = [job for job in batch if job.future.set_running_or_notify_cancel()]
            return batch

    def _finish(self, live: list[Job], results: list[Any]) -> None:
        with self._cond:
            self._running = []
            for job, result in zip(live, results):
                self._forget(job)
                if isinstance(result, Cancelled):
                    self.on_drop("running", job.units)
                elif job.waiters == 0 and not isinstance(result, BaseException):
                    self.on_drop("unclaimed", job.units)
        for job, result in zip(live, results):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = list(self._running)
            if not live:
                continue
            if self.on_batch:
                self.on_batch(sum(j.units for j in live))
            try:
                results = list(self.run_batch(live, self.should_stop))
            except BaseException as err:  # a batch-level failure fails only this batch's jobs
                results = [err] * len(live)
            self._finish(live, results)

    def close(self, timeout: float | None = None) -> None:
        """Answer queued jobs with ``ShuttingDown``, let the running batch finish (up to ``timeout``), stop."""
        with self._cond:
            self._stopping = True
            queued, self._queue = list(self._queue), collections.deque()
            for job in queued:
                self._forget(job)
            self._cond.notify_all()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the service is shutting down; retry on another instance"))
        self._thread.join(timeout)
