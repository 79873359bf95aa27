import base64
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import (
    BadRowPolicy,
    Column,
    TsvWriter,
    decode_image_base64,
    encode_image_base64,
    parse_schema,
    read_table,
    starts_with_header,
    truncate_partial_tail,
    unescape_cell,
)

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


def png_b64(color=(255, 0, 0), size=(8, 8), fmt="PNG", mode="RGB", **save):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def write(tmp_path, lines, name="t.tsv"):
    path = tmp_path / name
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
    return str(path)


def test_schema_parsing():
    assert parse_schema("idx:str:1,text:str:1") == [Column("idx", str, 1), Column("text", str, 1)]
    assert parse_schema("a:int:1, b:float:3") == [Column("a", int, 1), Column("b", float, 3)]


@pytest.mark.parametrize("text,match", [("", "empty"), ("idx:str", "name:type:len"), ("a:bool:1", "type 'bool'"),
                                        ("a:str:x", "length 'x'"), ("a:str:0", "length 0"),
                                        ("a:str:1,a:int:1", "appears twice")])
def test_schema_errors(text, match):
    with pytest.raises(UserError, match=match):
        parse_schema(text)


def test_typed_and_list_columns(tmp_path):
    path = write(tmp_path, ["1\t0.5\t1,2,3"])
    rows = list(read_table(path, parse_schema("a:int:1,b:float:1,c:int:3")))
    assert rows[0].values == {"a": 1, "b": 0.5, "c": [1, 2, 3]} and rows[0].line_number == 1


def test_skip_first_line_and_blank_lines(tmp_path):
    path = write(tmp_path, ["idx\ttext", "1\t一", "", "2\t二"])
    rows = list(read_table(path, parse_schema("idx:str:1,text:str:1"), skip_first_line=True))
    assert [(r["idx"], r["text"], r.line_number) for r in rows] == [("1", "一", 2), ("2", "二", 4)]


def test_images_in_every_alphabet_and_format(tmp_path):
    std = png_b64()
    urlsafe_nopad = base64.urlsafe_b64encode(base64.b64decode(std)).decode().rstrip("=")
    cells = [std, urlsafe_nopad, png_b64(fmt="JPEG"), png_b64(fmt="WEBP"), png_b64(fmt="GIF", mode="P", color=3),
             "b'" + std + "'"]
    path = write(tmp_path, [f"{i}\t文本\t{cell}" for i, cell in enumerate(cells)])
    rows = list(read_table(path, parse_schema(SCHEMA), image_columns=["imgbase64"]))
    assert len(rows) == len(cells)
    assert all(r["imgbase64"].mode == "RGB" and r["imgbase64"].size == (8, 8) for r in rows)
    assert rows[0]["imgbase64"].getpixel((0, 0)) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    image = decode_image_base64(png_b64(color=(255, 0, 0, 0), mode="RGBA"))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image_base64(base64.b64encode(buffer.getvalue()).decode())
    assert decoded.size == (2, 4)


def _bomb_b64():
    buffer = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buffer, format="PNG")  # 225 M pixels, a few kB compressed
    return base64.b64encode(buffer.getvalue()).decode()


def _truncated_b64():
    data = base64.b64decode(png_b64(color=(10, 200, 30), size=(64, 64), fmt="JPEG"))
    return base64.b64encode(data[: len(data) // 2]).decode()


BAD_LINES = {
    "wrong column count": "1\t只有两列",
    "undecodable base64": "2\t文本\t@@@not base64@@@",
    "not an image": "3\t文本\t" + base64.b64encode(b"hello, this is text, not a picture").decode(),
    "truncated or corrupt image": "4\t文本\t" + _truncated_b64(),
    "image too large": "5\t文本\t" + _bomb_b64(),
    "not UTF-8": b"6\t\xff\xfe bad\t" + png_b64().encode() + b"\n",
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_row_stops_with_file_line_and_reason(tmp_path, reason):
    path = write(tmp_path, [f"0\t好\t{png_b64()}", BAD_LINES[reason]])
    with pytest.raises(UserError) as err:
        list(read_table(path, parse_schema(SCHEMA), image_columns=["imgbase64"]))
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: {reason}")
    assert "skip_bad_rows=True" in message


def test_bad_rows_skipped_and_counted(tmp_path):
    lines = [f"0\t好\t{png_b64()}"] + [BAD_LINES[r] for r in sorted(BAD_LINES)] + [f"9\t好\t{png_b64()}",
                                                                                  BAD_LINES["wrong column count"]]
    path = write(tmp_path, lines)
    policy = BadRowPolicy(skip=True)
    rows = list(read_table(path, parse_schema(SCHEMA), policy=policy, image_columns=["imgbase64"]))
    assert [r["idx"] for r in rows] == ["0", "9"]
    assert policy.counts == {reason: (2 if reason == "wrong column count" else 1) for reason in BAD_LINES}
    assert policy.summary().startswith("skipped 7 bad rows (")


def test_bad_typed_value_is_a_bad_row(tmp_path):
    path = write(tmp_path, ["x\t1"])
    with pytest.raises(UserError, match="line 1: bad value: column 'a' expects int"):
        list(read_table(path, parse_schema("a:int:1,b:str:1")))


def test_missing_table_and_unknown_image_column(tmp_path):
    with pytest.raises(UserError, match="table not found"):
        list(read_table(str(tmp_path / "nope.tsv"), parse_schema(SCHEMA)))
    with pytest.raises(UserError, match="no column 'image'"):
        list(read_table(str(tmp_path / "nope.tsv"), parse_schema(SCHEMA), image_columns=["image"]))


def test_writer_escapes_tabs_and_newlines_and_round_trips(tmp_path):
    path = str(tmp_path / "out" / "o.tsv")
    with TsvWriter(path) as writer:
        writer.write_rows([["1", "a\tb\nc\\d"], ["2", "ok"]])
    lines = open(path, encoding="utf-8").read().split("\n")
    assert lines == ["1\ta\\tb\\nc\\\\d", "2\tok", ""]
    assert unescape_cell(lines[0].split("\t")[1]) == "a\tb\nc\\d"


def test_partial_last_row_is_dropped_before_append(tmp_path):
    path = tmp_path / "o.tsv"
    path.write_bytes(b"1\tdone\n2\thalf-writ")
    with TsvWriter(str(path), append=True) as writer:
        writer.write_rows([["2", "again"]])
    assert path.read_bytes() == b"1\tdone\n2\tagain\n"
    path.write_bytes(b"no newline at all")
    truncate_partial_tail(str(path))
    assert path.read_bytes() == b""


def test_encode_is_plain_standard_base64_png():
    text = encode_image_base64(Image.new("RGB", (4, 4), (1, 2, 3)))
    assert text.isascii() and not text.startswith("b'")
    assert base64.b64decode(text)[:8] == b"\x89PNG\r\n\x1a\n"


def test_reading_streams_without_loading_the_file(tmp_path):
    # ~200 MB of rows; peak RSS of a child process reading all of them must stay far below the file size.
    path = tmp_path / "big.tsv"
    cell = "x" * 10000
    with open(path, "w") as handle:
        for i in range(20000):
            handle.write(f"{i}\t{cell}\n")
    code = (f"import resource,sys; sys.path.insert(0, {os.getcwd()!r})\n"
            "from easynlp_ldm.tables import read_table, parse_schema\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"n = sum(1 for _ in read_table({str(path)!r}, parse_schema('idx:str:1,text:str:1')))\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 20000
    assert int(out[1]) < 50_000  # kB of growth while reading; the file is ~200 MB


def _encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,value,expected", [("I;16", 32896, 128), ("I;16", 65535, 255), ("I", 40000, 156),
                                                 ("F", 0.5, 128)])
def test_high_bit_depth_grayscale_is_scaled_not_clipped(mode, value, expected):
    import numpy as np

    from easynlp_ldm.tables import decode_image

    image = Image.new(mode, (8, 4), value)
    fmt = "PNG" if mode == "I;16" else "TIFF"  # PNG holds 16-bit gray; 32-bit int and float come as TIFF
    decoded = np.asarray(decode_image(_encoded(image, fmt)))
    assert decoded.shape == (4, 8, 3) and (decoded == decoded[0, 0]).all()
    assert abs(int(decoded[0, 0, 0]) - expected) <= 1


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_bmp_and_tiff_are_read(fmt):
    from easynlp_ldm.tables import decode_image

    decoded = decode_image(_encoded(Image.new("RGB", (6, 6), (200, 30, 40)), fmt))
    assert decoded.getpixel((2, 2)) == (200, 30, 40)


def test_a_data_uri_prefix_is_accepted():
    from easynlp_ldm.tables import decode_image_base64

    assert decode_image_base64("data:image/png;base64," + png_b64(color=(1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


def test_one_pixel_limit_stated_once_and_configurable(monkeypatch):
    from easynlp_ldm.tables import BadRow, decode_image

    data = _encoded(Image.new("L", (100, 100)))
    monkeypatch.setenv("EASYNLP_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(BadRow) as err:
        decode_image(data)
    assert err.value.reason == "image too large"
    assert "100×100" in err.value.detail and "EASYNLP_MAX_IMAGE_PIXELS" in err.value.detail
    monkeypatch.setenv("EASYNLP_MAX_IMAGE_PIXELS", "10000")
    assert decode_image(data).size == (100, 100)


# ------------------------------------------------------------------------- tables EasyNLP accepted (issue 30, 3)


def test_tables_easynlp_accepted_read_as_it_read_them(tmp_path):
    # a BOM, CRLF, a trailing tab, extra columns beyond the schema (EasyNLP zipped and ignored them), quoted cells
    # (a spreadsheet's TSV export) and EasyNLP's own predictor cells b'...' (the str of a bytes object)
    image = png_b64(color=(0, 0, 255))
    path = write(tmp_path, [
        b"\xef\xbb\xbf1\t\xe7\xba\xa2\t" + image.encode() + b"\r\n",
        f"2\t绿\t{image}\t\r\n".encode(),
        f"3\t蓝\t{image}\textra\tcolumns".encode() + b"\n",
        f'"4"\t"他说""好"""\t"{image}"'.encode() + b"\n",
        f"5\t黄\tb'{image}'\t".encode() + b"\n",
        f'"6"\t"a" and "b"\t"b\'{image}\'"'.encode() + b"\n",
    ])
    rows = list(read_table(path, parse_schema(SCHEMA), image_columns=["imgbase64"]))
    assert [(r["idx"], r["text"]) for r in rows] == [("1", "红"), ("2", "绿"), ("3", "蓝"), ("4", '他说"好"'),
                                                     ("5", "黄"), ("6", '"a" and "b"')]  # not CSV-quoted: kept
    assert all(r["imgbase64"].getpixel((0, 0)) == (0, 0, 255) for r in rows)


def test_fewer_columns_than_the_schema_is_still_a_bad_row(tmp_path):
    path = write(tmp_path, ["1\t只有两列\t", "2\t好"])
    with pytest.raises(UserError, match="line 2: wrong column count: expected 3 columns"):
        list(read_table(path, parse_schema(SCHEMA)))


@pytest.mark.parametrize("header", ["idx\ttext\timgbase64", "\ufeff\"IDX\"\t\"Text\"\t\"imgbase64\"\t",
                                    "id\tcaption\timage"])
def test_a_header_row_is_detected_skipped_and_noted(tmp_path, header, caplog):
    path = write(tmp_path, [header, f"1\t好\t{png_b64()}"])
    with caplog.at_level("WARNING"):
        rows = list(read_table(path, parse_schema(SCHEMA), image_columns=["imgbase64"]))
    assert [(r["idx"], r.line_number) for r in rows] == [("1", 2)]
    assert f"{path}: line 1" in caplog.text and "header" in caplog.text and "--skip_first_line" in caplog.text
    caplog.clear()
    assert len(list(read_table(path, parse_schema(SCHEMA), skip_first_line=True, image_columns=["imgbase64"]))) == 1
    assert "header" not in caplog.text  # said with the flag: no note


def test_header_detection_never_drops_a_data_row(tmp_path):
    # prompts (no image column): only the schema's own names make a header; "id / prompt" is a prompt like any other
    prompts = write(tmp_path, ["id\tprompt", "2\t好"], name="p.tsv")
    assert [r["idx"] for r in read_table(prompts, parse_schema("idx:str:1,text:str:1"))] == ["id", "2"]
    named = write(tmp_path, ["idx\ttext", "2\t好"], name="n.tsv")
    assert [r["idx"] for r in read_table(named, parse_schema("idx:str:1,text:str:1"))] == ["2"]
    # what predict's progress bar counts by
    assert starts_with_header(named, parse_schema("idx:str:1,text:str:1"))
    assert not starts_with_header(prompts, parse_schema("idx:str:1,text:str:1"))
    # a first row of names whose image decodes is data; one whose image does not stays a bad row unless it is names
    data = write(tmp_path, [f"idx\ttext\t{png_b64()}", f"2\t好\t{png_b64()}"], name="d.tsv")
    assert [r["idx"] for r in read_table(data, parse_schema(SCHEMA), image_columns=["imgbase64"])] == ["idx", "2"]
    bad = write(tmp_path, ["1\t好\tnot-base64!!", f"2\t好\t{png_b64()}"], name="b.tsv")
    with pytest.raises(UserError, match="line 1: undecodable base64"):
        list(read_table(bad, parse_schema(SCHEMA), image_columns=["imgbase64"]))


def test_skipping_every_row_of_a_table_is_an_error_naming_the_count(tmp_path):
    path = write(tmp_path, ["1\t好\tnot-base64!!", "2\t只有两列", "3\t好\t@@"])
    with pytest.raises(UserError) as err:
        list(read_table(path, parse_schema(SCHEMA), policy=BadRowPolicy(skip=True), image_columns=["imgbase64"]))
    message = str(err.value)
    assert message.startswith(f"{path}: no usable rows: all 3 rows are bad") and "\n" not in message
    assert "(2 undecodable base64, 1 wrong column count), the first line 1: undecodable base64" in message
