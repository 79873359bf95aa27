"""predicting.py: the progress record, truncation to the rows it records, and the merge of sharded parts."""

import os

from easynlp_ldm.predicting import Progress, merge_parts, part_path, progress_counts, truncate_rows


def test_progress_resumes_only_the_same_fingerprint_and_truncates_to_its_rows(tmp_path):
    outputs = str(tmp_path / "out.tsv")
    with open(outputs, "wb") as handle:
        handle.write(b"a\nb\nc-written-after-the-record\n")
    progress = Progress(outputs, "settings-1")
    progress.last_line, progress.rows = 4, 2
    progress.save()
    assert not Progress(outputs, "settings-2").load_resumable(outputs)
    resumed = Progress(outputs, "settings-1")
    assert resumed.load_resumable(outputs) and (resumed.last_line, resumed.rows) == (4, 2)
    truncate_rows(outputs, resumed.rows)
    assert open(outputs, "rb").read() == b"a\nb\n"


def test_parts_merge_in_input_order_and_are_removed(tmp_path):
    outputs = str(tmp_path / "out.tsv")
    lines = {0: [b"2\tsecond\n", b"4\tfourth\n"], 1: [b"1\tfirst\n", b"3\tthird\n", b"5\tfifth\n"]}
    for rank, rows in lines.items():
        Progress(part_path(outputs, rank, 2), "f").save(done=True)
        with open(part_path(outputs, rank, 2), "wb") as handle:
            handle.writelines(rows)
    assert merge_parts(outputs, 2) == 5
    assert open(outputs, "rb").read() == b"first\nsecond\nthird\nfourth\nfifth\n"
    assert os.listdir(tmp_path) == ["out.tsv"]


def test_progress_counts_a_shard_and_what_an_earlier_run_did(tmp_path):
    table = tmp_path / "t.tsv"
    table.write_bytes(b"header\nB\n\nD\nE\nF\n")  # data on lines 2, 4, 5 and 6
    assert progress_counts(str(table), True, 0) == (4, 0)
    assert progress_counts(str(table), True, 4) == (4, 2)
    assert progress_counts(str(table), True, 4, shard=(0, 2)) == (3, 2)  # lines 2, 4 and 6
