"""What ``--mode=evaluate`` writes to ``evaluate_output=DIR`` besides the images (``DIR/images/<model>/<idx>.png``):

* ``scores.tsv``: one row per prompt per model — model, idx, prompt, seed, image, then every score (empty where the
  image has none);
* ``summary.json``: the summary evaluate prints;
* ``report.html``: the images with their prompts and scores — a grid for one model, one row per prompt and one column
  per model for two — sortable by each score (and by each difference between two models) with a little inline
  JavaScript. No CDN, no network, image paths relative to DIR: the folder can be zipped and opened anywhere.

Every file is written atomically. ``ModelEvaluation`` and ``ImageRecord`` are what evaluate hands over.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from easynlp_ldm.files import atomic_write_text
from easynlp_ldm.tables import escape_cell
from shapes_data.scoring import ATTRIBUTES

FIXED_COLUMNS = ("model", "idx", "prompt", "seed", "image")


@dataclass
class ImageRecord:
    """One generated image: its row, seed, file (relative to evaluate_output; "" when none is written), scores."""

    idx: str
    prompt: str
    seed: int
    image: str
    scores: dict[str, float]


@dataclass
class ModelEvaluation:
    """One model's evaluation as evaluate hands it over: its label (file-safe, distinct), the model it loaded, its
    summary metrics and its images in table order."""

    label: str
    checkpoint: str
    metrics: dict[str, Any]  # the summary's keys for this model
    records: list[ImageRecord]

    def score_columns(self) -> dict[str, list[float]]:
        """Each per-image score by name, one value per prompt (NaN where the image has none)."""
        names = dict.fromkeys(name for record in self.records for name in record.scores)
        return {name: [record.scores.get(name, math.nan) for record in self.records] for name in names}


def score_names(evaluations: Sequence[ModelEvaluation]) -> list[str]:
    """Every per-image score of any model, in the order they were first met."""
    return list(dict.fromkeys(name for e in evaluations for r in e.records for name in r.scores))


def write(folder: str, evaluations: Sequence[ModelEvaluation], summary: dict) -> None:
    names = score_names(evaluations)
    atomic_write_text(os.path.join(folder, "scores.tsv"), scores_tsv(evaluations, names))
    atomic_write_text(os.path.join(folder, "summary.json"), json.dumps(summary, ensure_ascii=False, indent=2))
    atomic_write_text(os.path.join(folder, "report.html"), report_html(evaluations, names, summary))


def cell(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def scores_tsv(evaluations: Sequence[ModelEvaluation], names: list[str]) -> str:
    lines = ["\t".join((*FIXED_COLUMNS, *names))]
    for evaluation in evaluations:
        for record in evaluation.records:
            cells = [evaluation.label, record.idx, record.prompt, str(record.seed), record.image]
            lines.append("\t".join([escape_cell(c) for c in cells] + [cell(record.scores.get(n)) for n in names]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- the page
STYLE = """
body{font-family:system-ui,"Noto Sans CJK SC","Microsoft YaHei",sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin:0 0 10px}
table.summary{border-collapse:collapse;font-size:13px;margin:0 0 12px}
table.summary td,table.summary th{border:1px solid #ddd;padding:3px 8px;text-align:right;background:#fff}
table.summary th:first-child,table.summary td:first-child{text-align:left}
.sortbar{font-size:13px;margin:0 0 10px;display:flex;flex-wrap:wrap;gap:4px 16px}
.sortbar .group{display:flex;flex-wrap:wrap;gap:4px;align-items:center} .sortbar.stacked{flex-direction:column}
.sortbar .group b{min-width:9em}
.sortbar button{font-size:12px;border:1px solid #bbb;background:#fff;border-radius:4px;padding:2px 8px;cursor:pointer}
.sortbar button.active{background:#2b6cb0;color:#fff;border-color:#2b6cb0}
#items.grid{display:flex;flex-wrap:wrap;gap:10px}
#items.grid .item{width:180px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
#items.rows .item,#items.rows .head{display:grid;grid-template-columns:220px repeat(var(--models),200px);gap:10px;
  background:#fff;border-bottom:1px solid #ddd;padding:6px}
#items.rows .head{font-weight:600;background:#eee;position:sticky;top:0;z-index:1}
.prompt{font-size:13px;margin:0 0 4px;word-break:break-all} .idx{color:#888;font-size:11px}
figure{margin:0} img{width:160px;height:auto;image-rendering:pixelated;display:block;background:#eee}
figcaption{font-size:11px;color:#444;line-height:1.4} .ok{color:#2f855a} .wrong{color:#c53030}
"""

SCRIPT = """
const items = document.getElementById('items');
let current = null, descending = true;
function sortBy(button) {
  const key = button.dataset.key;
  descending = current === key ? !descending : key !== 'order';
  current = key;
  const rows = Array.from(items.querySelectorAll('.item'));
  const value = (row) => { const v = SCORES[row.dataset.i][key]; return v === null || v === undefined ? NaN : v; };
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
    return descending ? y - x : x - y;
  });
  rows.forEach((row) => items.appendChild(row));
  document.querySelectorAll('.sortbar button').forEach((b) => {
    b.classList.toggle('active', b === button);
    b.textContent = b.dataset.label + (b === button ? (descending ? ' \\u25bc' : ' \\u25b2') : '');
  });
}
document.querySelectorAll('.sortbar button').forEach((b) => b.addEventListener('click', () => sortBy(b)));
"""


def label_of(name: str) -> str:
    return name.replace("judge_", "judge ").replace("_", " ")


def shown(name: str, value: float) -> str:
    """A score as the page shows it: the judge's verdicts as ✓/✗, numbers with four significant digits."""
    if name.startswith("judge_"):
        return '<span class="ok">✓</span>' if value else '<span class="wrong">✗</span>'
    return f"{value:.4g}"


def report_html(evaluations: Sequence[ModelEvaluation], names: list[str], summary: dict) -> str:
    compared = len(evaluations) > 1
    keys, scores = sort_keys(evaluations, names)
    esc = html.escape
    groups = {}
    for group, key, label in keys:
        groups.setdefault(group, []).append(f'<button type="button" data-key="{esc(key)}" data-label="{esc(label)}">'
                                            f"{esc(label)}</button>")
    buttons = "".join(f'<span class="group"><b>{esc(group)}</b>{"".join(b)}</span>' for group, b in groups.items())
    items = []
    if compared:
        items.append('<div class="head"><div>prompt</div>' +
                     "".join(f"<div>{esc(e.label)}</div>" for e in evaluations) + "</div>")
    for i, first in enumerate(evaluations[0].records):
        figures = []
        for evaluation in evaluations:
            record = evaluation.records[i]
            present = [n for n in names if n in record.scores and math.isfinite(record.scores[n])]
            lines = [f"{esc(label_of(n))} {shown(n, record.scores[n])}" for n in present if not n.startswith("judge_")]
            verdicts = [f"{esc(n[len('judge_'):].replace('_', ' '))}{shown(n, record.scores[n])}" for n in present
                        if n.startswith("judge_")]
            if verdicts:
                lines.append("judge: " + " ".join(verdicts))
            caption = "<br>".join(lines)
            image = f'<img src="{esc(record.image)}" alt="{esc(record.prompt)}">' if record.image else ""
            figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
        items.append(f'<div class="item" data-i="{i}"><div class="prompt">{esc(first.prompt)} '
                     f'<span class="idx">#{esc(first.idx)} · seed {first.seed}</span></div>{"".join(figures)}</div>')
    title = "Evaluation: " + " vs ".join(e.label for e in evaluations)
    meta = f"{summary.get('table', '')} · {len(evaluations[0].records)} prompts"
    return (f'<!doctype html>\n<html lang="zh"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n<p class=\"meta\">{esc(meta)}</p>\n"
            f"{summary_table(evaluations, summary)}\n"
            f'<div class="sortbar{" stacked" if compared else ""}">{buttons}</div>\n'
            f'<div id="items" class="{"rows" if compared else "grid"}" style="--models:{len(evaluations)}">\n'
            + "\n".join(items) + "\n</div>\n"
            f"<script>const SCORES = {json.dumps(scores)};{SCRIPT}</script>\n</body></html>\n")


def sort_keys(evaluations: Sequence[ModelEvaluation], names: list[str]) -> tuple[list[tuple[str, str, str]],
                                                                                  list[dict]]:
    """The sort buttons (group, key, label) — table order, each score of each model, each difference of two — and
    per prompt the value of every key."""
    compared = len(evaluations) > 1
    keys = [("sort by", "order", "table order")]
    scores = [{"order": -i} for i in range(len(evaluations[0].records))]
    for m, evaluation in enumerate(evaluations):
        for name in names:
            keys.append((evaluation.label if compared else "sort by", f"{m}:{name}", label_of(name)))
            for i, record in enumerate(evaluation.records):
                scores[i][f"{m}:{name}"] = finite(record.scores.get(name))
    if compared:
        for name in names:
            keys.append((f"{evaluations[1].label} − {evaluations[0].label}", f"diff:{name}", label_of(name)))
            for row in scores:
                a, b = row[f"0:{name}"], row[f"1:{name}"]
                row[f"diff:{name}"] = None if a is None or b is None else b - a
    return keys, scores


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_table(evaluations: Sequence[ModelEvaluation], summary: dict) -> str:
    """The mean of each metric per model (and, for two, the difference with its interval)."""
    metrics = [name for name in ("steps", "clip_score", "preference_score", "fid", "kid", "val_loss")
               if any(e.metrics.get(name) is not None for e in evaluations)]
    accuracy = any("accuracy" in e.metrics for e in evaluations)
    if not metrics and not accuracy:
        return ""
    difference = summary.get("difference", {})
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(e.label)}</th>" for e in evaluations) + \
        ("<th>difference (95% CI)</th>" if len(evaluations) > 1 else "") + "</tr>"
    rows = []

    def row(label: str, values: list, diff: dict | None):
        cells = "".join(f"<td>{'' if v is None else f'{v:.4g}'}</td>" for v in values)
        if len(evaluations) > 1:
            text = ""
            if diff and diff.get("difference") is not None:
                text = f"{diff['difference']:+.4g}"
                if diff.get("ci95"):
                    text += f" [{diff['ci95'][0]:+.4g}, {diff['ci95'][1]:+.4g}]"
            cells += f"<td>{text}</td>"
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")

    for name in metrics:
        row(label_of(name), [e.metrics.get(name) for e in evaluations], difference.get(name))
    if accuracy:
        groups = [e.metrics.get("accuracy", {}).get("all", {}) for e in evaluations]
        for attribute in ATTRIBUTES:
            if groups[0].get(f"{attribute}_n"):
                row(f"shapes judge: {attribute.replace('_', ' ')} (accuracy, {groups[0][f'{attribute}_n']} prompts)",
                    [group.get(f"{attribute}_acc") for group in groups], difference.get(f"judge_{attribute}"))
    return f'<table class="summary">{head}{"".join(rows)}</table>'
