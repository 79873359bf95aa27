"""TSV tables: ``--input_schema``, a streaming reader with a bad-row policy, a crash-safe writer, and the base64
image codec.

A table is read line by line (a 2 GB file never sits in memory). A bad row (wrong column count, not UTF-8, a value
that does not fit its type, an image that cannot be decoded) stops the run with one line naming the file, the line
number and the reason — or, with ``skip_bad_rows=True``, is skipped and counted per reason. Training reads its tables
in one pass that notes every bad row (``BadRowPolicy(collect=True)``) and then reports them all at once.

What EasyNLP's reader accepted is read the same way: columns beyond ``--input_schema`` (a trailing tab, appended
columns) are ignored, a UTF-8 BOM and CR/LF line ends are dropped, CSV-style quoted cells (``"…"``, ``""`` inside)
are unquoted, and base64 written as the str of a bytes object (``b'…'``, EasyNLP's predictor output) is decoded. A
first line that is plainly a header (the schema's column names, or names with an image cell that is no image) is
skipped with a note; a table whose every row is bad is an error even with ``skip_bad_rows=True``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import io
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from easynlp_ldm.aigc import AigcLabel
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_text

logger = logging.getLogger("easynlp.data")

# ----------------------------------------------------------------------------------------------------- schema

_SCHEMA_TYPES = {"str": str, "int": int, "float": float}


@dataclass(frozen=True)
class Column:
    name: str
    type: type
    length: int  # >1: the cell holds a comma-separated list of this many values


def parse_schema(text: str, flag: str = "--input_schema") -> list[Column]:
    """``name:type:len,...`` → columns. Types str/int/float; len ≥ 1."""
    if not text or not text.strip():
        raise UserError(f"{flag} is empty; give it as name:type:len,... e.g. idx:str:1,text:str:1")
    columns = []
    for part in text.split(","):
        pieces = part.strip().split(":")
        if len(pieces) != 3 or not pieces[0]:
            raise UserError(f"{flag}: '{part}' is not name:type:len (e.g. text:str:1)")
        name, kind, length = pieces
        if kind not in _SCHEMA_TYPES:
            raise UserError(f"{flag}: column '{name}' has type '{kind}'; use str, int or float")
        try:
            count = int(length)
        except ValueError:
            raise UserError(f"{flag}: column '{name}' has length '{length}'; use a positive integer") from None
        if count < 1:
            raise UserError(f"{flag}: column '{name}' has length {count}; use a positive integer")
        if any(c.name == name for c in columns):
            raise UserError(f"{flag}: column '{name}' appears twice")
        columns.append(Column(name, _SCHEMA_TYPES[kind], count))
    return columns


def split_tables(text: str | None) -> list[str]:
    if not text:
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------------ bad rows


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is a short category used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class BadRowPolicy:
    """What a bad row does: stop at the first one (default), or — with ``collect`` (the training pass) — note it and
    go on, so that one pass finds every bad row and ``finish`` reports them all; with ``skip`` bad rows are skipped,
    noted and counted per reason."""

    SHOWN = 20  # bad rows listed on screen by ``finish``; the file lists all

    def __init__(self, skip: bool = False, collect: bool = False):
        self.skip, self.collect = skip, collect
        self.counts: Counter[str] = Counter()
        self.rows: list[tuple[str, int, str, str]] = []  # (file, line, reason, detail), in reading order

    def handle(self, path: str, line_number: int, bad: BadRow) -> None:
        if not (self.skip or self.collect):
            detail = f": {bad.detail}" if bad.detail else ""
            raise UserError(f"{path}, line {line_number}: {bad.reason}{detail} "
                            "(fix the row, or pass skip_bad_rows=True in --user_defined_parameters to skip such rows)")
        self.counts[bad.reason] += 1
        self.rows.append((path, line_number, bad.reason, bad.detail))

    def nothing_left(self, path: str, since: int = 0) -> None:
        """Every row of ``path`` was bad (the ones noted after the first ``since``): an error naming the count, the
        reasons and the first, not an empty result."""
        rows = [row for row in self.rows[since:] if row[0] == path]
        counts = Counter(reason for _, _, reason, _ in rows)
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        _, line, reason, detail = rows[0]
        what = f"all {len(rows)} rows are bad" if len(rows) > 1 else "its one row is bad"
        raise UserError(f"{path}: no usable rows: {what} ({reasons}), the first line {line}: {reason}"
                        f"{': ' + detail if detail else ''}; fix the rows, or check --input_schema")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def stopping(self) -> bool:
        """A bad row was found and the run will stop after the pass (collect without skip): the pass need not do
        more than find the others."""
        return bool(self.rows) and not self.skip

    def summary(self) -> str:
        if not self.counts:
            return "no bad rows"
        parts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
        return f"skipped {self.total} bad rows ({parts})"

    def write(self, path: str) -> None:
        """Every bad row noted, as a TSV (file, line, reason, detail) written atomically."""
        lines = ["file\tline\treason\tdetail"] + [
            "\t".join(escape_cell(cell) for cell in (file, str(line), reason, detail))
            for file, line, reason, detail in self.rows]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")

    def finish(self, report: str | None, log) -> None:
        """After the pass: with bad rows noted, write them all to ``report`` (a bad_rows.tsv path; None: no file) and
        show the first ``SHOWN`` through ``log``; then, unless skipping, stop with one line naming the count, the
        first row and the report."""
        if not self.rows:
            return
        if report:
            self.write(report)
        where = f"; all {self.total} are listed in {report}" if report else ""
        for file, line, reason, detail in self.rows[:self.SHOWN]:
            log(f"{'skipped' if self.skip else 'bad row'}: {file}, line {line}: {reason}"
                f"{': ' + detail if detail else ''}")
        if len(self.rows) > self.SHOWN:
            log(f"… and {len(self.rows) - self.SHOWN} more{where}")
        if self.skip:
            return
        file, line, reason, _ = self.rows[0]
        raise UserError(f"{self.total} bad rows ({', '.join(f'{n} {r}' for r, n in sorted(self.counts.items()))}), "
                        f"the first {file}, line {line}: {reason}{where or ''}; fix them, or pass skip_bad_rows=True "
                        f"in --user_defined_parameters to skip such rows")


# -------------------------------------------------------------------------------------------------- reading


@dataclass
class Row:
    """One parsed input row: ``values`` by column name, plus where it came from."""

    values: dict[str, Any]
    path: str
    line_number: int  # 1-based, counting every physical line including a skipped header

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def _convert_cell(column: Column, cell: str) -> Any:
    def one(text: str):
        if column.type is str:
            return text
        try:
            return column.type(text)
        except ValueError:
            detail = f"column '{column.name}' expects {column.type.__name__}, got {text[:40]!r}"
            raise BadRow("bad value", detail) from None

    if column.length == 1:
        return one(cell)
    items = cell.split(",")
    if len(items) != column.length:
        raise BadRow("bad value", f"column '{column.name}' expects {column.length} comma-separated values, "
                     f"got {len(items)}")
    return [one(item) for item in items]


def _unquote(cell: str) -> str:
    """A CSV-quoted cell (``"…"`` with any ``"`` inside doubled) → its text; any other cell as it is."""
    if len(cell) >= 2 and cell[0] == cell[-1] == '"' and '"' not in cell[1:-1].replace('""', ""):
        return cell[1:-1].replace('""', '"')
    return cell


def split_line(raw: bytes) -> list[str]:
    """One physical line → its cells: UTF-8 (a leading BOM dropped), the CR/LF line end stripped, cells unquoted."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRow("not UTF-8", f"byte {err.start}") from None
    text = text.removeprefix(codecs.BOM_UTF8.decode("utf-8")).rstrip("\n").rstrip("\r")
    return [_unquote(cell) for cell in text.split("\t")]


def parse_cells(cells: Sequence[str], schema: Sequence[Column]) -> dict[str, Any]:
    """Cells → values by column name; cells beyond the schema are ignored (as EasyNLP did), fewer is a bad row."""
    if len(cells) < len(schema):
        raise BadRow("wrong column count", f"expected {len(schema)} columns "
                     f"({','.join(c.name for c in schema)}), got {len(cells)}")
    return {column.name: _convert_cell(column, cell) for column, cell in zip(schema, cells)}


def parse_line(raw: bytes, schema: Sequence[Column]) -> dict[str, Any]:
    return parse_cells(split_line(raw), schema)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def is_header(cells: Sequence[str], schema: Sequence[Column], image_columns: Sequence[str] = ()) -> bool:
    """A first line that cannot be data: its cells are the schema's column names, or (with image columns) they are
    all names and an image cell is no image — a row that would be a bad row anyway. Never a row that reads as data."""
    head = [cell.strip() for cell in cells[:len(schema)]]
    if len(head) < len(schema):
        return False
    if [cell.lower() for cell in head] == [column.name.lower() for column in schema]:
        return True
    if not image_columns or not all(_NAME.fullmatch(cell) for cell in head):
        return False
    index = {column.name: i for i, column in enumerate(schema)}
    for name in image_columns:
        try:
            decode_image_base64(head[index[name]])
        except BadRow:
            return True
    return False


def starts_with_header(path: str, schema: Sequence[Column]) -> bool:
    """Whether ``read_table`` (without image columns) skips the first line of ``path`` as a header."""
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        return is_header(split_line(first), schema)
    except BadRow:
        return False


def read_table(path: str, schema: Sequence[Column], *, skip_first_line: bool = False,
               policy: BadRowPolicy | None = None, start_line: int = 0,
               image_columns: Sequence[str] = ()) -> Iterator[Row]:
    """Stream the rows of ``path``. Blank lines are ignored. ``start_line``: skip physical lines up to it.
    ``image_columns``: base64 cells decoded to RGB PIL images here, so an undecodable image is a bad row with its
    line number like any other. Without ``skip_first_line``, a first line that is a header (``is_header``) is
    skipped with a note. A table read from its start whose every row is bad (skipped) is a ``UserError``."""
    policy = policy or BadRowPolicy()
    missing = [name for name in image_columns if name not in {c.name for c in schema}]
    if missing:
        raise UserError(f"--input_schema has no column '{missing[0]}' (columns: {', '.join(c.name for c in schema)})")
    if not os.path.isfile(path):
        raise UserError(f"{path}: table not found (check --tables)")
    bad_before, good, extra_noted = policy.total, 0, False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number <= start_line or (skip_first_line and line_number == 1):
                continue
            if not raw.strip():
                continue
            try:
                cells = split_line(raw)
                if line_number == 1 and is_header(cells, schema, image_columns):
                    logger.warning("%s: line 1 (%s) looks like a header and is skipped; pass --skip_first_line to "
                                   "say so", path, ", ".join(cells[:len(schema)]))
                    continue
                values = parse_cells(cells, schema)
                for name in image_columns:
                    values[name] = decode_image_base64(values[name])
            except BadRow as bad:
                policy.handle(path, line_number, bad)
                continue
            if not extra_noted and any(cell.strip() for cell in cells[len(schema):]):
                extra_noted = True
                logger.info("%s: line %d has %d columns; --input_schema names %d: the columns after '%s' are "
                            "ignored, as EasyNLP did", path, line_number, len(cells), len(schema), schema[-1].name)
            good += 1
            yield Row(values, path, line_number)
    if not good and start_line == 0 and policy.skip and policy.total > bad_before:
        policy.nothing_left(path, bad_before)


def table_digest(path: str) -> str:
    """A digest of a table's bytes, read in blocks; remembered per (path, size, mtime, inode), so a table is read
    once per process however often its identity is asked for."""
    stat = os.stat(path)
    return _file_digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()[:32]


def count_rows(path: str, skip_first_line: bool = False) -> int:
    """Non-blank data lines, read in blocks (for progress bars; does not validate)."""
    count = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if skip_first_line and line_number == 1:
                continue
            if raw.strip():
                count += 1
    return count


# -------------------------------------------------------------------------------------------------- writing


def escape_cell(value: Any) -> str:
    """Tabs, newlines and backslashes inside a cell are escaped so one row stays one line."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def unescape_cell(text: str) -> str:
    out, i = [], 0
    mapping = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in mapping:
            out.append(mapping[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def format_row(cells: Sequence[Any]) -> bytes:
    return ("\t".join(escape_cell(cell) for cell in cells) + "\n").encode("utf-8")


class TsvWriter:
    """Appends whole rows: each batch is one ``write`` of complete lines followed by a flush, so an interrupted run
    leaves at worst a partial last line, which ``truncate_partial_tail`` removes before resuming."""

    def __init__(self, path: str, append: bool = False, fsync: bool = False):
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            if append:
                truncate_partial_tail(path)
            self._handle = open(path, "ab" if append else "wb")
        except OSError as err:
            raise UserError(f"{path}: cannot write the output ({err.strerror})") from None
        self.path = path
        self.fsync = fsync

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        data = b"".join(format_row(row) for row in rows)
        try:
            self._handle.write(data)
            self._handle.flush()
            if self.fsync:
                os.fsync(self._handle.fileno())
        except OSError as err:
            raise UserError(f"{self.path}: writing failed ({err.strerror}); rows written so far are complete") \
                from None

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_partial_tail(path: str) -> None:
    """Drop a last line without its newline (a write cut short by a crash)."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb+") as handle:
        block = 1 << 16
        position = size
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            if position == size and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                handle.truncate(start + cut + 1)
                return
            position = start
        handle.truncate(0)


# --------------------------------------------------------------------------------------------- image codec

MAX_IMAGE_PIXELS = 200_000_000  # the one pixel limit (a 16k × 12k photo passes); EASYNLP_MAX_IMAGE_PIXELS changes it
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "MPO", "BMP", "TIFF"}  # MPO: multi-picture JPEG from phone cameras


def max_image_pixels() -> int:
    value = os.environ.get("EASYNLP_MAX_IMAGE_PIXELS", "")
    try:
        return int(value) if value else MAX_IMAGE_PIXELS
    except ValueError:
        raise UserError(f"EASYNLP_MAX_IMAGE_PIXELS={value!r} must be a whole number of pixels") from None


def _to_8bit(image):
    """16-bit and 32-bit grayscale (I;16*, I, F) → 8-bit L by scaling, not clipping (Pillow's convert clips: a 16-bit
    PNG came out white)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), "L")


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe alphabet, with or without padding, surrounding whitespace ignored."""
    cleaned = "".join(text.split())
    if cleaned.startswith(("b'", 'b"')) and cleaned.endswith(("'", '"')):
        cleaned = cleaned[2:-1]  # EasyNLP's predictor wrote Python bytes literals: b'iVBOR...'
    if cleaned.startswith("data:") and "," in cleaned:
        cleaned = cleaned.split(",", 1)[1]  # a data URI: data:image/jpeg;base64,/9j/...
    if not cleaned:
        raise BadRow("undecodable base64", "empty image cell")
    cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRow("undecodable base64", str(err)) from None


def decode_image(data: bytes):
    """Bytes → RGB PIL image: EXIF orientation applied, alpha composited on white, first frame of a GIF."""
    from PIL import Image, ImageOps

    limit = max_image_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the one limit is ours, checked below
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise BadRow("not an image", f"format {image.format} (use PNG, JPEG, WebP, GIF, BMP or TIFF)")
            if image.width * image.height > limit:
                raise BadRow("image too large", f"{image.width}×{image.height} = {image.width * image.height / 1e6:.0f}"
                             f" M pixels; the limit is {limit / 1e6:.0f} M (set EASYNLP_MAX_IMAGE_PIXELS to raise it)")
            image.seek(0)
            image.load()
        except BadRow:
            raise
        except Image.UnidentifiedImageError:
            raise BadRow("not an image", "bytes are not a PNG, JPEG, WebP, GIF, BMP or TIFF image") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise BadRow("truncated or corrupt image", str(err)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not lose an otherwise good image
        pass
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def decode_image_base64(text: str):
    return decode_image(decode_base64(text))


def encode_image(image, image_format: str = "png", quality: int = 95, label: AigcLabel | None = None) -> bytes:
    """The image file's bytes; with ``label``, its AIGC labels (easynlp_ldm/aigc.py): the visible one drawn when
    asked, the implicit one as metadata (PNG: XMP iTXt and an ``AIGC`` text chunk; JPEG: the XMP APP1 segment)."""
    buffer = io.BytesIO()
    fmt = image_format.lower()
    if label is not None:
        image = label.drawn(image)
    if fmt == "png":
        image.save(buffer, format="PNG", **({"pnginfo": label.png_info()} if label else {}))
    elif fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality,
                                  **({"xmp": label.xmp().encode("utf-8")} if label else {}))
    else:
        raise ValueError(f"unknown image format {image_format}")
    return buffer.getvalue()


def encode_image_base64(image, image_format: str = "png") -> str:
    """Standard base64 (plain ASCII) of the encoded image file."""
    return base64.b64encode(encode_image(image, image_format)).decode("ascii")
