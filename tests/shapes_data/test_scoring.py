"""Prompt-following scoring on the shapes data set (shapes_data/scoring.py), with images from a stand-in generator:
the data set's own renders. ``--mode=evaluate`` end to end: tests/appzoo/latent_diffusion/test_evaluate.py."""

import pytest

import shapes_data as shapes
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import parse_schema, read_table
from shapes_data.scoring import (
    accuracy_line,
    judge_prompt,
    load_truth_by_idx,
    prompt_following,
    stated_attributes,
    truth_path_for,
)

SPEC_KEYS = ("colour", "shape", "background", "size", "position", "cx", "cy", "extent", "image_size")


def test_stated_attributes_and_judge_prompt():
    record = {"colour": "红色", "shape": "圆形", "background": "白色", "size": "小", "position": "左上"}
    assert stated_attributes("一个红色的圆形", record, "x") == {"colour": "红色", "shape": "圆形"}
    assert stated_attributes("一个小的红色圆形位于白色背景的左上角", record, "x") == record
    # a sidecar without size/position (older or hand-written): the prompt's own words are the truth
    assert stated_attributes("左上角有一个红色的圆形", {"colour": "红色", "shape": "圆形"}, "x")["position"] == "左上"
    with pytest.raises(UserError, match="line 3: .*says position 右下 but the ground truth says 左上"):
        stated_attributes("右下角有一个红色的圆形", record, "line 3")
    verdict = shapes.JudgeResult("红色", "圆形", "白色", "大", "左上")
    ok = judge_prompt(verdict, {"colour": "红色", "shape": "圆形", "size": "小"})
    assert ok == {"colour": True, "shape": True, "background": None, "size": False, "position": None, "both": True,
                  "all_stated": False}
    assert judge_prompt(verdict, {"position": "左上"})["both"] is None
    assert judge_prompt(verdict, {})["all_stated"] is None
    assert judge_prompt(shapes.JudgeResult("红色", None, "白色"), {"colour": "红色", "shape": "圆形"})["both"] is False
    acc = {"n": 4, **{f"{a}_n": 4 for a in ("colour", "shape", "both", "background", "all_stated")},
           **{f"{a}_acc": 0.5 for a in ("colour", "shape", "both", "background", "size", "position", "all_stated")},
           "size_n": 2, "position_n": 0}
    line = accuracy_line(acc)
    assert line.startswith("colour 50.0%, shape 50.0%, both 50.0%, background 50.0%, size 50.0% of 2, ")
    assert line.endswith("position not stated, all stated attributes 50.0%")


def renders(records, calls, colour=None):
    """generate(prompts, line_numbers) drawing each row's own spec (in another colour when given)."""

    def generate(prompts, line_numbers):
        calls.append(line_numbers)
        specs = [{k: records[n - 1][k] for k in SPEC_KEYS} for n in line_numbers]
        return [shapes.render(shapes.ShapeSpec(**dict(s, colour=colour or s["colour"])), 64) for s in specs]

    return generate


def test_prompt_following_batches_the_rows_and_scores_what_generate_returns(dataset):
    table = str(dataset / "T2I_heldout.tsv")
    truth = load_truth_by_idx(truth_path_for(table, ""))
    records, calls = list(truth.values()), []
    rows = read_table(table, parse_schema("idx:str:1,text:str:1"))
    acc = prompt_following(rows, renders(records, calls), truth, table, "text", batch_size=4, max_rows=10)
    assert calls == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert acc["all"] == acc["heldout"] and "seen" not in acc
    assert acc["all"]["n"] == acc["all"]["colour_n"] == 10 and acc["all"]["all_stated_acc"] == 1.0
    other = "绿色" if records[0]["colour"] != "绿色" else "红色"
    rows = read_table(table, parse_schema("idx:str:1,text:str:1"))
    wrong = prompt_following(rows, renders(records, [], other), truth, table, "text", batch_size=4, max_rows=1)
    assert (wrong["all"]["colour_acc"], wrong["all"]["shape_acc"], wrong["all"]["both_acc"]) == (0.0, 1.0, 0.0)


def test_missing_or_unreadable_truth_is_a_user_error(dataset, tmp_path):
    table = str(dataset / "T2I_test.tsv")
    truth = load_truth_by_idx(truth_path_for(table, ""))
    records = list(truth.values())
    del truth[records[1]["idx"]]
    rows = read_table(table, parse_schema("idx:str:1,text:str:1"))
    with pytest.raises(UserError, match=f"line 2: idx {records[1]['idx']} has no ground truth in the sidecar"):
        prompt_following(rows, renders(records, []), truth, table, "text", batch_size=2)
    assert truth_path_for(str(tmp_path / "t.tsv"), "") is None
    with pytest.raises(UserError, match="truth_file=.*nope.jsonl: not found"):
        truth_path_for(table, str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.truth.jsonl"
    bad.write_text('{"idx": "1"}\n\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="bad.truth.jsonl, line 3: not a JSON object with an idx"):
        load_truth_by_idx(str(bad))
