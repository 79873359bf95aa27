"""Resumable, sharded prediction output, for any app's predict mode.

An app appends its output rows per batch and then records how far it got (``Progress``, ``OUTPUT.progress.json``:
the fingerprint of what decides the output, the last input line done, the rows written). A rerun whose fingerprint
matches keeps the rows recorded (``truncate_rows`` drops any written after the record) and goes on after that line;
any other run replaces the output. Several processes: rows are sharded by input line number, each process writes
and resumes its own part (``part_path``; its rows prefixed with their input line number) and ``merge_parts`` makes
the one output, in input order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os

from easynlp_ldm.files import atomic_open, atomic_write_bytes

PROGRESS_SUFFIX = ".progress.json"


def file_fingerprint(path: str) -> dict:
    """What identifies a file's version for a resume: its path, size, mtime and a digest of its first MiB."""
    stat = os.stat(path)
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


class Progress:
    """``OUTPUT.progress.json``: which settings wrote the output, the last input line done and the rows written."""

    def __init__(self, outputs: str, fingerprint: str):
        self.path = outputs + PROGRESS_SUFFIX
        self.fingerprint = fingerprint
        self.last_line, self.rows = 0, 0

    def load_resumable(self, outputs: str) -> bool:
        if not (os.path.isfile(self.path) and os.path.isfile(outputs)):
            return False
        try:
            with open(self.path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return False
        if record.get("fingerprint") != self.fingerprint:
            return False
        self.last_line, self.rows = int(record["last_line"]), int(record["rows"])
        return True

    def save(self, done: bool = False) -> None:
        atomic_write_bytes(self.path, json.dumps({"fingerprint": self.fingerprint, "last_line": self.last_line,
                                                  "rows": self.rows, "done": done}).encode())


def truncate_rows(path: str, rows: int) -> None:
    """Keep the first ``rows`` complete lines (rows written after the last progress record are redone)."""
    with open(path, "rb+") as handle:
        kept = 0
        position = 0
        for line in handle:
            if kept == rows:
                break
            position += len(line)
            kept += 1
        handle.seek(position)
        handle.truncate()


def progress_counts(path: str, skip_first_line: bool, done_through: int,
                    shard: tuple[int, int] | None = None) -> tuple[int, int]:
    """A progress bar's total and starting point: the non-blank data lines of this process's share of the table
    (sharded by line number as the rows are), and how many of them lie at or before input line ``done_through``
    (done by an earlier run that this one resumes)."""
    total = done = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if (skip_first_line and line_number == 1) or not raw.strip():
                continue
            if shard and line_number % shard[1] != shard[0]:
                continue
            total += 1
            done += line_number <= done_through
    return total, done


def part_path(outputs: str, rank: int, world_size: int) -> str:
    """The part of ``outputs`` that process ``rank`` of ``world_size`` writes (and resumes)."""
    return f"{outputs}.part{rank}of{world_size}"


def merge_parts(outputs: str, world_size: int) -> int:
    """The parts of the ``world_size`` processes (each line prefixed with its input line number, in input order) →
    one output in input order, written atomically; the parts and their progress records are then removed. Returns
    the rows written."""
    parts = [part_path(outputs, rank, world_size) for rank in range(world_size)]

    def rows(path):
        with open(path, "rb") as handle:
            for line in handle:
                number, _, rest = line.partition(b"\t")
                yield int(number), rest

    count = 0
    with atomic_open(outputs, "wb") as out:
        for _, rest in heapq.merge(*(rows(p) for p in parts), key=lambda item: item[0]):
            out.write(rest)
            count += 1
    for path in parts:
        os.unlink(path)
        os.unlink(path + PROGRESS_SUFFIX)
    return count
