"""Dynamic batching: concurrent requests with the same batch key share one model call.

One worker thread owns the model. It takes the oldest queued job, then gathers queued jobs with the same key (in
arrival order) until ``max_batch_size`` work units are collected or ``max_wait_ms`` has passed since the first job
arrived, runs them together and resolves each job's future with its own result or its own exception — one bad
request never fails its neighbours. Jobs with other keys stay queued, in order.
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


@dataclass
class Job:
    key: Hashable
    payload: Any
    units: int  # how much of a batch it takes (images)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job]], list[Any]], *, max_batch_size: int = 8,
                 max_wait_ms: float = 50.0, max_queue: int = 64, on_batch: Callable[[int], None] | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="easynlp-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, key: Hashable, payload: Any, units: int = 1) -> Job:
        job = Job(key, payload, max(1, units))
        with self._cond:
            if self._stopping:
                raise QueueFull("shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests queued")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (e.g. its client timed out)."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
        job.future.cancel()
        return True

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._queue and not self._stopping:
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
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            try:
                if live:
                    if self.on_batch:
                        self.on_batch(sum(j.units for j in live))
                    results = self.run_batch(live)
                    for job, result in zip(live, results):
                        if isinstance(result, BaseException):
                            job.future.set_exception(result)
                        else:
                            job.future.set_result(result)
            except BaseException as err:  # a batch-level failure fails only this batch's jobs
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued and in-flight jobs, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
