"""Prompt-following accuracy on the shapes data set: images generated for a table's prompts, judged from their pixels
by :func:`shapes_data.judge.judge` against the table's ground-truth sidecar (``TABLE.truth.jsonl``, as
:mod:`shapes_data.generate` writes it).

Which attributes a prompt states comes from parsing it (:func:`shapes_data.generate.parse_caption`); the value it is
judged against is the sidecar's (the parsed one where the sidecar has none), and a sidecar value that contradicts the
prompt is an error (the sidecar does not belong to the table). Per group (``seen`` / ``heldout`` colour×shape pairs,
and ``all``): ``n`` prompts; for each attribute of ``ATTRIBUTES`` ``<attribute>_n`` (prompts stating it),
``_correct`` and ``_acc`` (correct / its n); ``both`` counts prompts stating colour and shape, right when both are;
``all_stated`` counts prompts stating at least one attribute, right when every attribute they state is.

The images come from the caller (``generate``): this module knows the data set, not the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence

from PIL import Image

from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import Row
from shapes_data.generate import parse_caption
from shapes_data.judge import AccuracyCounter, judge

# What a prompt can state, in the order the judge reports them; "both" and "all_stated" are derived.
STATED_ATTRIBUTES = ("colour", "shape", "background", "size", "position")
ATTRIBUTES = ("colour", "shape", "both", "background", "size", "position", "all_stated")

# generate(prompts, line numbers of their rows) -> one image per prompt
GenerateImages = Callable[[list[str], list[int]], Sequence[Image.Image]]


def truth_path_for(table: str, given: str) -> str | None:
    if given:
        if not os.path.isfile(given):
            raise UserError(f"truth_file={given}: not found")
        return given
    candidate = os.path.splitext(table)[0] + ".truth.jsonl"
    return candidate if os.path.isfile(candidate) else None


def load_truth_by_idx(path: str) -> dict[str, dict]:
    truth = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                truth[str(record["idx"])] = record
            except (ValueError, KeyError):
                raise UserError(f"{path}, line {number}: not a JSON object with an idx") from None
    return truth


def stated_attributes(prompt: str, record: dict, where: str) -> dict[str, str]:
    """{attribute: expected value} for every attribute ``prompt`` states; the value is the truth record's (the
    prompt's own where the record lacks it). A record value that contradicts the prompt is a UserError."""
    stated = {}
    for attribute, said in parse_caption(prompt).items():
        if said is None:
            continue
        truth = record.get(attribute)
        if truth is not None and truth != said:
            raise UserError(f"{where}: the prompt {prompt!r} says {attribute} {said} but the ground truth says "
                            f"{truth}: the truth sidecar does not belong to this table")
        stated[attribute] = said if truth is None else truth
    return stated


def judge_prompt(verdict, stated: dict[str, str]) -> dict[str, bool | None]:
    """Right/wrong per attribute of ATTRIBUTES (None: not stated, not counted) for one judged image."""
    ok: dict[str, bool | None] = {a: (getattr(verdict, a) == stated[a] if a in stated else None)
                                  for a in STATED_ATTRIBUTES}
    ok["both"] = (ok["colour"] and ok["shape"]) if "colour" in stated and "shape" in stated else None
    ok["all_stated"] = all(ok[a] for a in stated) if stated else None
    return ok


class PromptFollowing:
    """Images judged one at a time against ``truth`` (the sidecar of ``table``, by idx): ``add`` gives one image's
    verdicts, ``summary`` the accuracy per group (the module docstring)."""

    def __init__(self, truth: dict[str, dict], table: str, prompt_column: str):
        self.truth, self.table, self.prompt_column = truth, table, prompt_column
        self.counter = AccuracyCounter(ATTRIBUTES, per_attribute_n=True)

    def add(self, row: Row, image: Image.Image) -> dict[str, bool | None]:
        """Right/wrong per attribute of ATTRIBUTES (None: not stated) for ``row``'s image, counted in its group; a
        row whose idx has no truth record is a UserError."""
        idx = str(row.values.get("idx", row.line_number))
        record = self.truth.get(idx)
        if record is None:
            raise UserError(f"{self.table}, line {row.line_number}: idx {idx} has no ground truth in the sidecar")
        stated = stated_attributes(str(row[self.prompt_column]), record, f"{self.table}, line {row.line_number}")
        ok = judge_prompt(judge(image), stated)
        group = "heldout" if record.get("heldout") else "seen"
        for key in (group, "all"):
            self.counter.add(key, **ok)
        return ok

    def summary(self) -> dict:
        return self.counter.summary()


def prompt_following(rows: Iterable[Row], generate: GenerateImages, truth: dict[str, dict], table: str,
                     prompt_column: str, batch_size: int, max_rows: int = 0) -> dict:
    """Accuracy per group (see the module docstring) over ``rows`` of ``table`` (the first ``max_rows`` when it is
    not 0), generating ``batch_size`` prompts at a time; a row whose idx has no truth record is a UserError."""
    tally = PromptFollowing(truth, table, prompt_column)
    batch = []

    def flush():
        images = generate([str(r[prompt_column]) for r in batch], [r.line_number for r in batch])
        for row, image in zip(batch, images):
            tally.add(row, image)
        batch.clear()

    seen_rows = 0
    for row in rows:
        batch.append(row)
        seen_rows += 1
        if len(batch) == batch_size:
            flush()
        if max_rows and seen_rows >= max_rows:
            break
    if batch:
        flush()
    return tally.summary()


def accuracy_line(acc: dict) -> str:
    """One group's accuracies for the log: every attribute, with its n where it is not every prompt."""
    parts = []
    for attribute in ATTRIBUTES:
        label = "all stated attributes" if attribute == "all_stated" else attribute
        n = acc[f"{attribute}_n"]
        if not n:
            parts.append(f"{label} not stated")
        elif n == acc["n"]:
            parts.append(f"{label} {100 * acc[f'{attribute}_acc']:.1f}%")
        else:
            parts.append(f"{label} {100 * acc[f'{attribute}_acc']:.1f}% of {n}")
    return ", ".join(parts)
