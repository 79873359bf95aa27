"""Training and prediction on tables as users have them (issue 30): bad rows beside a validation table, a table
that changed since a finished run, and the tables EasyNLP accepted (its own predictor output, CRLF, a BOM, trailing
tabs, quoted cells, a header row)."""

import base64
import os

import pytest

from easynlp_ldm import cli
from tests.helpers import predict_argv, read_rows

SCHEMA = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"


def shapes_rows(shapes_data, count, name="T2I_train.tsv"):
    return read_rows(os.path.join(shapes_data, name))[:count]


def train_on(tables, out, model, *extra, udp=""):
    return ["--mode=train", f"--tables={tables}", SCHEMA, "--first_sequence=text", "--second_sequence=imgbase64",
            f"--checkpoint_dir={out}", "--micro_batch_size=4", "--epoch_num=1", "--random_seed=42", *extra,
            f"--user_defined_parameters=pretrain_model_name_or_path={model} sample_images=0 {udp}"]


# ------------------------------------------------------------------------------ bad rows and a validation table


def test_bad_rows_beside_a_validation_table_are_listed_then_skipped(tiny_model_dir, shapes_data, tmp_path, capsys,
                                                                    caplog):
    # lines 3, 7, 11: not base64, a missing column, base64 of text — with a validation table this used to end in
    # "RuntimeError: stack expects a non-empty TensorList" with nothing listed
    lines = ["\t".join(row) for row in shapes_rows(shapes_data, 12)]
    lines[2] = "bad\t坏行\tnot-base64!!"
    lines[6] = "bad\tonly two columns"
    lines[10] = "bad\t空白\t" + base64.b64encode(b"GIF89a not really").decode()
    table = tmp_path / "bad.tsv"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tables = f"{table},{os.path.join(shapes_data, 'T2I_val.tsv')}"
    run = tmp_path / "run"
    assert cli.main(train_on(tables, run, tiny_model_dir)) == 2
    err = capsys.readouterr().err
    assert "3 bad rows" in err and f"the first {table}, line 3: undecodable base64" in err
    assert str(run / "bad_rows.tsv") in err and "Traceback" not in err
    listed = [row.split("\t")[1:3] for row in (run / "bad_rows.tsv").read_text().splitlines()[1:]]
    assert listed == [["3", "undecodable base64"], ["7", "wrong column count"], ["11", "not an image"]]
    caplog.set_level("INFO")
    assert cli.main(train_on(tables, run, tiny_model_dir, udp="skip_bad_rows=True")) == 0
    assert "skipped 3 bad rows" in caplog.text and "best validation loss" in caplog.text
    assert len((run / "bad_rows.tsv").read_text().splitlines()) == 4


@pytest.mark.parametrize("with_validation", [True, False], ids=["with_validation", "alone"])
def test_a_table_whose_only_row_is_bad_is_one_line_naming_file_and_count(tiny_model_dir, shapes_data, tmp_path,
                                                                         capsys, with_validation):
    table = tmp_path / "one.tsv"
    table.write_text("1\t红色的圆形\t@@not an image@@\n", encoding="utf-8")
    tables = f"{table},{os.path.join(shapes_data, 'T2I_val.tsv')}" if with_validation else str(table)
    run = tmp_path / "run"
    assert cli.main(train_on(tables, run, tiny_model_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert f"the first {table}, line 1: undecodable base64" in err and "Traceback" not in err
    assert cli.main(train_on(tables, run, tiny_model_dir, udp="skip_bad_rows=True")) == 2
    err = capsys.readouterr().err.strip()
    assert f"{table}: no usable rows: its one row is bad (1 undecodable base64" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (run / "training_state").exists()


def test_skip_bad_rows_on_a_prompt_table_of_bad_rows_is_an_error_not_an_empty_output(tiny_model_dir, tmp_path,
                                                                                     capsys):
    table = tmp_path / "p.tsv"
    table.write_text("1\n2\n", encoding="utf-8")  # no text column on either row
    out = tmp_path / "o.tsv"
    assert cli.main(predict_argv(str(table), str(out), tiny_model_dir, udp="skip_bad_rows=True ddim_steps=2")) == 2
    assert (f"{table}: no usable rows: all 2 rows are bad (2 wrong column count), the first line 1: wrong column "
            "count: expected 2 columns (idx,text), got 1") in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.tsv.progress.json").exists()


# ---------------------------------------------------------------------------------------- a changed table


def test_rerun_after_the_table_changed_is_another_run(tiny_model_dir, shapes_data, tmp_path, capsys, caplog):
    table = tmp_path / "train.tsv"
    rows = shapes_rows(shapes_data, 6)
    table.write_text("".join("\t".join(row) + "\n" for row in rows[:4]), encoding="utf-8")
    run = tmp_path / "run"
    argv = train_on(str(table), run, tiny_model_dir)
    caplog.set_level("INFO")
    assert cli.main(argv) == 0
    os.utime(table, (1, 1))  # touched, the same bytes: the same run
    assert cli.main(argv) == 0 and "holds this run, complete (1 steps): nothing to do" in caplog.text
    with open(table, "a", encoding="utf-8") as handle:  # two rows appended
        handle.write("".join("\t".join(row) + "\n" for row in rows[4:]))
    caplog.clear()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing to do" not in caplog.text
    assert f"already holds a run with other settings (the contents of {table} changed)" in err
    assert f"--resume_from_checkpoint={run}" in err and "overwrite_checkpoint_dir=True" in err
    argv[-1] += " overwrite_checkpoint_dir=True"
    assert cli.main(argv) == 0 and f"{table}: 6 images encoded" in caplog.text


# ---------------------------------------------------------------------------------- tables EasyNLP accepted


def easynlp_table(kind, rows):
    """``rows`` (idx, text, base64) written as ``kind``."""
    if kind == "easynlp_predictor_output":  # output_schema idx,text,gen_imgbase64 with --append_cols=text
        return "".join(f"{i}\t{t}\tb'{b}'\t{t}\n" for i, t, b in rows).encode()
    lines = ["\t".join(row) for row in rows]
    if kind == "quoted":
        lines = ["\t".join(f'"{cell}"' for cell in row) for row in rows]
    if kind == "trailing_tabs":
        lines = [line + "\t" for line in lines]
    if kind == "header":
        lines.insert(0, "idx\ttext\timgbase64")
    data = "".join(line + ("\r\n" if kind == "crlf" else "\n") for line in lines).encode()
    return b"\xef\xbb\xbf" + data if kind == "bom" else data


@pytest.mark.parametrize("kind", ["easynlp_predictor_output", "crlf", "bom", "trailing_tabs", "quoted", "header"])
def test_tables_easynlp_accepted_train_and_predict(tiny_model_dir, shapes_data, tmp_path, caplog, kind):
    rows = shapes_rows(shapes_data, 4)
    table = tmp_path / f"{kind}.tsv"
    table.write_bytes(easynlp_table(kind, rows))
    run = tmp_path / "run"
    caplog.set_level("INFO")
    assert cli.main(train_on(f"{table},{table}", run, tiny_model_dir)) == 0  # validated on itself too
    assert f"{table}: 4 images encoded" in caplog.text and not (run / "bad_rows.tsv").exists()
    assert ("line 1 (idx, text, imgbase64) looks like a header" in caplog.text) == (kind == "header")
    out = tmp_path / "out.tsv"
    assert cli.main(predict_argv(str(table), str(out), str(run), "--output_schema=idx,text",
                                 udp="n_samples=1 ddim_steps=2 optimize=none")) == 0  # no OpenVINO conversion
    assert read_rows(out) == [[idx, text] for idx, text, _ in rows]  # no BOM, no quotes, no header


def test_a_training_table_left_without_rows_is_one_line_naming_it(tiny_model_dir, shapes_data, tmp_path, capsys):
    table = tmp_path / "header_only.tsv"
    table.write_text("idx\ttext\timgbase64\n\n", encoding="utf-8")
    assert cli.main(train_on(f"{table},{os.path.join(shapes_data, 'T2I_val.tsv')}", tmp_path / "run",
                             tiny_model_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{table}: no rows left to train on (the table has no data rows, or every row was left out: "
                        "see the lines above)") and len(err.splitlines()) == 1
