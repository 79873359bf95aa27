"""What a mode reads from the flags besides the model: its tables and their columns, predict's output columns, and
the prompt length in tokens. One rule each, the same in every mode.

Columns: the caption/prompt column is ``--first_sequence``, else ``text`` when the schema has it, else the last
column that is not the image column; the image column is ``--second_sequence``, else ``imgbase64``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import Column, parse_schema, split_tables
from modelzoo.ldm import LatentDiffusion

PROMPT_SCHEMA = "idx:str:1,text:str:1"
PAIR_SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"
OUTPUT_COLUMNS = ("idx", "text", "gen_imgbase64", "sample_id", "seed", "image_path", "aigc_produce_id")
DEFAULT_OUTPUT_SCHEMA = "idx,text,gen_imgbase64"
logger = logging.getLogger("easynlp")

TABLES_HINT = {"train": "train.tsv[,valid.tsv]", "predict": "a TSV of prompts",
               "evaluate": "the table to evaluate on: prompts with a .truth.jsonl sidecar, or captions with images"}


@dataclass(frozen=True)
class InputTables:
    tables: list[str]
    schema: list[Column]
    text_column: str
    image_column: str | None  # None when the schema has no image column
    skip_first_line: bool

    @property
    def table(self) -> str:
        """The table predict and evaluate read: the last of ``--tables``, as EasyNLP did."""
        return self.tables[-1]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.schema]


def input_tables(flags: ParsedFlags, mode: str, *, default_schema: str | None, max_tables: int | None = None,
                 need_image: bool = False) -> InputTables:
    """``--tables``/``--input_schema``/``--first_sequence``/``--second_sequence`` → the tables and their columns.
    ``default_schema`` None: ``--input_schema`` is required."""
    tables = split_tables(flags.tables)
    if not tables:
        raise UserError(f"--tables is required for --mode={mode} ({TABLES_HINT[mode]})")
    for table in tables:
        check_table(table)
    if max_tables and len(tables) > max_tables:
        raise UserError(f"--tables: {mode} takes at most {max_tables} tables, got {len(tables)}")
    if not flags.input_schema and default_schema is None:
        raise UserError(f"--input_schema is required, e.g. {PAIR_SCHEMA}")
    schema = parse_schema(flags.input_schema or default_schema)
    names = [c.name for c in schema]
    image = flags.second_sequence or "imgbase64"
    if image not in names:
        if need_image:
            raise UserError(f"--second_sequence={image} is not a column of --input_schema ({', '.join(names)})")
        image = None
    others = [name for name in names if name != image]
    text = flags.first_sequence or ("text" if "text" in names else (others[-1] if others else "text"))
    if text not in names:
        raise UserError(f"--first_sequence={text} is not a column of --input_schema ({', '.join(names)})")
    return InputTables(tables, schema, text, image, flags.skip_first_line)


def check_table(path: str) -> None:
    """A table this toolkit can read: a local file (EasyNLP's ``odps://`` tables live in MaxCompute)."""
    if path.startswith("odps://"):
        raise UserError(f"--tables: {path} is a MaxCompute (ODPS) table; this toolkit reads local TSV files — "
                        f"download it (e.g. with the odpscmd `tunnel download` command) and pass the file")
    if not os.path.exists(path):
        raise UserError(f"--tables: {path}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"--tables: {path} is not a file (a TSV table is expected)")
    if not os.access(path, os.R_OK):
        raise UserError(f"--tables: {path} cannot be read (permission denied)")


def output_columns(flags: ParsedFlags, inputs: InputTables) -> tuple[list[str], list[str]]:
    """``--output_schema`` (generated columns) and ``--append_cols`` (input columns copied to each output row)."""
    generated = [c.strip() for c in (flags.output_schema or DEFAULT_OUTPUT_SCHEMA).split(",") if c.strip()]
    for column in generated:
        if column not in OUTPUT_COLUMNS:
            raise UserError(f"--output_schema: unknown column '{column}'; available: {', '.join(OUTPUT_COLUMNS)} "
                            f"(use --append_cols for input columns)")
    appended = [c.strip() for c in (flags.append_cols or "").split(",") if c.strip()]
    for column in appended:
        if column not in inputs.names:
            raise UserError(f"--append_cols: '{column}' is not a column of --input_schema "
                            f"({', '.join(inputs.names)})")
    return generated, appended


def requested_text_length(flags: ParsedFlags) -> int | None:
    """``--sequence_length`` when the user gave it; None lets the model use its own length."""
    return flags.sequence_length if "sequence_length" in flags.given else None


def text_length(model: LatentDiffusion, flags: ParsedFlags, text_len: int = 0) -> int:
    """Tokens per prompt: EasyNLP's ``text_len`` when a mode takes it (train), else ``--sequence_length`` when given,
    else the model's own; clamped to the text encoder's positions."""
    if text_len:
        if "sequence_length" in flags.given:
            logger.info("text_len=%d is used instead of --sequence_length=%d", text_len, flags.sequence_length)
        return model.clamp_text_length(text_len)
    return model.clamp_text_length(requested_text_length(flags))
