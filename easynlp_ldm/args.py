"""EasyNLP's common flags (names, aliases, defaults) and the typed ``--user_defined_parameters`` parser.

EasyNLP silently dropped unknown flags and kept every user-defined value as a string (so ``write_image=False`` was
true). Here every flag is declared once in ``FLAGS``; a flag the user gives is either honoured, reported as having no
effect in the chosen mode, or rejected with a message saying what to do instead.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from easynlp_ldm.errors import UserError

MODES = ("train", "evaluate", "predict", "export", "serve")
ALL_MODES = frozenset(MODES)
TRAIN = frozenset({"train"})
RUNS_MODEL = frozenset({"train", "evaluate", "predict", "serve"})
READS_TABLES = frozenset({"train", "evaluate", "predict"})

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    """``true/false/True/False/1/0`` (and yes/no, on/off); anything else is a ``ValueError``."""
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false, True/False or 1/0)")


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


def convert_value(kind: type, text: str) -> Any:
    if kind is bool:
        return parse_bool(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    ``modes``: where the flag has an effect. Given elsewhere it is accepted (EasyNLP scripts pass training flags to
    predict) and a note says it has no effect. ``unsupported``: a reason the flag can never work here; giving it with
    a non-default value is an error carrying that reason.
    """

    names: tuple[str, ...]
    type: type
    default: Any
    help: str
    modes: frozenset = ALL_MODES
    choices: tuple | None = None
    unsupported: str | None = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-")


def _f(names, kind, default, help, modes=ALL_MODES, choices=None, unsupported=None) -> Flag:
    if isinstance(names, str):
        names = (names,)
    return Flag(tuple(names), kind, default, help, frozenset(modes), choices, unsupported)


_PAI_TF = "is a PAI-TF/ODPS option that this PyTorch toolkit cannot use; remove it"

FLAGS: tuple[Flag, ...] = (
    # What to do.
    _f("--mode", str, "train", "what to run: train, evaluate, predict, export (package a model), serve (HTTP API)",
       choices=MODES),
    _f("--app_name", str, "latent_diffusion",
       "application to run (EasyNLP's default was text_classify; this toolkit's app is latent_diffusion)"),
    _f("--user_defined_parameters", str, None,
       "app settings as whitespace/newline-separated key=value pairs; values are typed per the app "
       "(see `easynlp --app_name=latent_diffusion --help`)"),
    _f("--random_seed", int, 1234, "seed for python, numpy and torch; every random choice derives from it"),
    # Data.
    _f("--tables", str, None, "comma-separated TSV files: train uses the first and validates on the second; "
       "evaluate and predict use the last", modes=READS_TABLES),
    _f("--skip_first_line", bool, False, "skip a header line in every input table", modes=READS_TABLES),
    _f("--input_schema", str, None, "columns of the input tables, name:type:len,... (type str/int/float; "
       "len>1: a comma-separated list)", modes=READS_TABLES),
    _f("--first_sequence", str, None, "input column holding the text (prompt/caption)", modes=READS_TABLES),
    _f("--second_sequence", str, None, "input column holding the base64 image (train/evaluate)",
       modes=frozenset({"train", "evaluate"})),
    _f("--label_name", str, None, "input column holding a label (no diffusion app uses one)",
       modes=frozenset(), unsupported="has no meaning for text-to-image apps (there are no labels); remove it"),
    _f("--label_enumerate_values", str, None, "label values (classification apps only)", modes=frozenset(),
       unsupported="has no meaning for text-to-image apps (there are no labels); remove it"),
    _f("--outputs", str, None, "output file: the predictions TSV (predict), the package (export)",
       modes=frozenset({"predict", "export", "evaluate"})),
    _f("--output_schema", str, "", "output columns, comma-separated (predict)", modes=frozenset({"predict"})),
    _f("--append_cols", str, None, "input columns copied to every output row (predict)",
       modes=frozenset({"predict"})),
    _f("--sequence_length", int, 16, "maximum text length in tokens (clamped to the text encoder's limit)",
       modes=RUNS_MODEL),
    _f("--do_lower_case", bool, False, "lower-case text before tokenising (the Chinese BERT vocab is uncased "
       "already)", modes=RUNS_MODEL),
    _f("--data_threads", int, 10, "data-loader worker processes (training); 0 reads in the main process",
       modes=TRAIN),
    # Model and checkpoints.
    _f(("--checkpoint_dir", "--checkpoint_path"), str, None,
       "output folder (train); model folder or name (evaluate, predict, serve, export)"),
    _f("--modelzoo_base_dir", str, "", "extra folder in which model names are looked up",
       modes=ALL_MODES),
    _f("--resume_from_checkpoint", str, None, "training-state folder to continue from exactly", modes=TRAIN),
    _f("--save_checkpoint_steps", int, None, "validate and save every N optimiser steps", modes=TRAIN),
    _f("--save_all_checkpoints", bool, False, "keep every checkpoint (otherwise the last and the best)",
       modes=TRAIN),
    _f("--export_tf_checkpoint_type", str, "easytransfer", "TensorFlow export (EasyNLP only)", modes=frozenset(),
       unsupported="exports TensorFlow checkpoints, which this toolkit does not produce; use --mode=export"),
    # Optimisation.
    _f("--learning_rate", float, 5e-5, "peak learning rate", modes=TRAIN),
    _f(("--weight_decay", "--wd"), float, 1e-4, "weight decay (none on biases and norms)", modes=TRAIN),
    _f(("--max_grad_norm", "--mn"), float, 1.0, "gradient clipping norm (0 disables)", modes=TRAIN),
    _f(("--optimizer_type", "--optimizer"), str, "AdamW", "AdamW, Adam or SGD (BertAdam is taken as AdamW)",
       modes=TRAIN, choices=("AdamW", "Adam", "SGD", "BertAdam")),
    _f("--warmup_proportion", float, 0.1, "fraction of steps of linear warm-up, then linear decay to 0",
       modes=TRAIN),
    _f("--epoch_num", float, 3.0, "epochs to train (fractions allowed)", modes=TRAIN),
    _f(("--micro_batch_size", "--train_batch_size"), int, 2,
       "examples per process per step; also the predict/evaluate batch", modes=RUNS_MODEL),
    _f("--gradient_accumulation_steps", int, 1, "micro-batches per optimiser step", modes=TRAIN),
    _f("--logging_steps", int, 100, "log a console line every N optimiser steps", modes=TRAIN),
    _f("--use_amp", bool, False, "mixed precision: bf16 autocast on CPU (fp32, with a warning, where the CPU has no "
       "native bf16), fp16/bf16 on CUDA", modes=RUNS_MODEL),
    _f("--use_torchacc", bool, False, "PAI TorchAcc (not available)", modes=frozenset(),
       unsupported="needs PAI's TorchAcc, which is not available; use --use_amp (and optimize=max for predict)"),
    # Serving.
    _f("--host", str, "127.0.0.1", "serve: address to listen on (loopback by default; 0.0.0.0 for all)",
       modes=frozenset({"serve"})),
    _f("--port", int, 8000, "serve: port to listen on", modes=frozenset({"serve"})),
    _f("--api_token", str, None, "serve: require Authorization: Bearer TOKEN (or set EASYNLP_API_TOKEN)",
       modes=frozenset({"serve"})),
    # Processes.
    _f("--worker_gpu", int, -1, "processes per node (-1: one)", modes=RUNS_MODEL),
    _f("--worker_count", int, 1, "number of nodes", modes=RUNS_MODEL),
    _f("--worker_cpu", int, -1, "CPU threads per process (-1: torch's default)", modes=ALL_MODES),
    _f("--master_port", int, 23456, "rendezvous port (default: $MASTER_PORT, else 23456)", modes=RUNS_MODEL),
    _f("--master_addr", str, None, "rendezvous address of node 0 (default: $MASTER_ADDR, else 127.0.0.1)",
       modes=RUNS_MODEL),
    _f("--node_rank", int, None, "this node's index, 0..worker_count-1 (default: $NODE_RANK, else 0)",
       modes=RUNS_MODEL),
    _f("--collective_timeout", float, 1800.0, "seconds before a stuck collective (e.g. a dead peer) fails the job",
       modes=RUNS_MODEL),
    _f("--distributed_backend", str, "nccl", "nccl or gloo for several processes (EasyNLP's default nccl; a process "
       "without CUDA uses gloo instead, with a note)", modes=RUNS_MODEL, choices=("nccl", "gloo")),
    _f("--local_rank", int, None, "set by legacy launchers; accepted and read from LOCAL_RANK instead",
       modes=ALL_MODES),
    # EasyNLP/PAI-TF options with no meaning here: accepted at their defaults, refused otherwise.
    _f("--user_script", str, None, "EasyNLP user script", modes=frozenset(),
       unsupported="runs arbitrary EasyNLP user scripts, which this toolkit does not do; call your script with python"),
    _f("--user_entry_file", str, None, "EasyNLP user entry file", modes=frozenset(),
       unsupported="runs arbitrary EasyNLP user scripts, which this toolkit does not do; call your script with python"),
    _f("--buckets", str, None, "OSS buckets", modes=frozenset(),
       unsupported="reads OSS buckets, which this toolkit does not do; copy the files locally"),
    _f("--odps_config", str, None, "ODPS config", modes=frozenset(), unsupported=_PAI_TF),
    # EasyNLP's threaded predictor's tuning: accepted with any value, noted as having no effect (predict streams
    # by --micro_batch_size; --worker_cpu sets threads).
    _f("--predict_slice_size", int, 4096, "EasyNLP's predictor slice size; predict here streams by "
       "--micro_batch_size", modes=frozenset()),
    _f("--predict_queue_size", int, 1024, "EasyNLP's predictor queue size; predict here streams by "
       "--micro_batch_size", modes=frozenset()),
    _f("--predict_thread_num", int, 2, "EasyNLP's predictor threads; use --worker_cpu for threads here",
       modes=frozenset()),
    _f("--predict_table_read_thread_num", int, 16, "EasyNLP's predictor reader threads; use --worker_cpu for "
       "threads here", modes=frozenset()),
    _f("--mg_model", bool, False, "EasyNLP: the pretrained model was trained with Megatron/DeepSpeed; models here "
       "load by their folder layout", modes=frozenset()),
    _f("--restore_works_dir", str, "./.easynlp_predict_restore_works_dir", "PAI-TF fail-over", modes=frozenset(),
       unsupported=_PAI_TF + " (predict resumes by itself)"),
    _f("--ps_hosts", str, "", "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--chief_hosts", str, "", "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--worker_hosts", str, None, "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--job_name", str, None, "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--task_index", int, 0, "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--task_count", int, 1, "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
    _f("--is_chief", str, "", "PAI-TF", modes=frozenset(), unsupported=_PAI_TF),
)

FLAGS_BY_DEST = {flag.dest: flag for flag in FLAGS}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        raise UserError(f"{message} (see easynlp --help)")


def _bool_action_type(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(app_help: str = "") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="easynlp",
        description="EasyNLP-compatible text-to-image latent diffusion: train, evaluate, predict, export, serve.",
        epilog=app_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # so we know exactly which flags the user gave
    )
    for flag in FLAGS:
        note = f" [default: {flag.default!r}]"
        if flag.unsupported:
            note += " [not supported here]"
        elif not flag.modes:
            note += " [accepted; no effect here]"
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": flag.help + note}
        if flag.type is bool:
            # EasyNLP used store_true; scripts also write --flag=True/False. Accept both.
            kwargs.update(nargs="?", const=True, type=_bool_action_type, metavar="BOOL")
        else:
            kwargs.update(type=flag.type, metavar=flag.dest.upper())
            if flag.choices:
                kwargs["choices"] = flag.choices
        parser.add_argument(*flag.names, **kwargs)
    return parser


@dataclass
class ParsedFlags:
    values: dict[str, Any]
    given: frozenset[str]
    notes: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def parse_flags(argv: Sequence[str], app_help: str = "") -> ParsedFlags:
    """Parse ``argv``; refuse unsupported flags; note flags that have no effect in the chosen mode."""
    namespace = build_parser(app_help).parse_args(list(argv))
    given = frozenset(vars(namespace))
    values = {flag.dest: flag.default for flag in FLAGS}
    values.update(vars(namespace))
    mode = values["mode"]
    notes = []
    for dest in sorted(given):
        flag = FLAGS_BY_DEST[dest]
        if flag.unsupported:
            if values[dest] != flag.default:
                raise UserError(f"--{dest} {flag.unsupported}")
            notes.append(f"--{dest} is accepted at its default and has no effect here")
        elif not flag.modes:
            notes.append(f"--{dest} is accepted and has no effect here ({flag.help})")
        elif mode not in flag.modes:
            notes.append(f"--{dest} has no effect in --mode={mode}")
    for dest in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if values[dest] is not None and values[dest] < 1:
            raise UserError(f"--{dest} must be at least 1, got {values[dest]}")
    if values["save_checkpoint_steps"] is not None and values["save_checkpoint_steps"] < 1:
        raise UserError(f"--save_checkpoint_steps must be at least 1, got {values['save_checkpoint_steps']}")
    if values["epoch_num"] <= 0:
        raise UserError(f"--epoch_num must be positive, got {values['epoch_num']}")
    if not 0 <= values["warmup_proportion"] <= 1:
        raise UserError(f"--warmup_proportion must be within [0, 1], got {values['warmup_proportion']}")
    return ParsedFlags(values=values, given=given, notes=notes)


# --------------------------------------------------------------------------------------------------------------
# user_defined_parameters


@dataclass(frozen=True)
class Param:
    """One user-defined parameter of an app, declared once: the parser, --help and validation all read this."""

    name: str
    type: type
    default: Any
    help: str
    modes: frozenset = ALL_MODES
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None when the value is fine

    def describe(self) -> str:
        names = self.name + "".join(f" / {alias}" for alias in self.aliases)
        kind = _TYPE_NAMES[self.type]
        choices = f" one of {', '.join(map(str, self.choices))};" if self.choices else ""
        modes = ",".join(m for m in MODES if m in self.modes) or "accepted, no effect here"
        return f"  {names} ({kind}, default {self.default!r};{choices} {modes}): {self.help}"


def split_user_defined_parameters(text: str | None) -> list[tuple[str, str]]:
    """``key=value`` pairs separated by whitespace or newlines; a value may contain '=' and may be quoted."""
    if not text or not text.strip():
        return []
    try:
        tokens = shlex.split(text, comments=False, posix=True)
    except ValueError as err:
        raise UserError(f"--user_defined_parameters: {err}; quote values containing spaces consistently") from None
    pairs = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UserError(f"--user_defined_parameters: {token!r} is not key=value")
        pairs.append((key, value))
    return pairs


def parse_user_defined_parameters(text: str | None, params: Iterable[Param], mode: str,
                                  app_name: str = "app") -> tuple[dict[str, Any], list[str]]:
    """Type and validate ``text`` against ``params``. Returns (values for every param, notes for the log)."""
    return validate_parameters(split_user_defined_parameters(text), params, mode, app_name)


def _typed_value(kind: type, value: Any) -> Any:
    """A value from text (``--user_defined_parameters``) or from Python (the ``pipeline()`` API) as ``kind``."""
    if isinstance(value, str):
        return convert_value(kind, value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool) \
            and (kind is float or float(value).is_integer()):
        return kind(value)
    raise ValueError(value)


def validate_parameters(pairs: Iterable[tuple[str, Any]], params: Iterable[Param], mode: str, app_name: str = "app",
                        source: str = "--user_defined_parameters") -> tuple[dict[str, Any], list[str]]:
    """Type and validate (key, value) pairs against ``params``; values may be text or Python values. Returns
    (values for every param, notes for the log); ``source`` names where the pairs came from in errors."""
    params = list(params)
    by_name: dict[str, Param] = {}
    for param in params:
        for name in (param.name, *param.aliases):
            by_name[name] = param
    valid = ", ".join(sorted(p.name for p in params))
    values = {param.name: param.default for param in params}
    seen: dict[str, str] = {}
    notes = []
    for key, raw in pairs:
        param = by_name.get(key)
        if param is None:
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: unknown key '{key}'{hint} for app {app_name}; valid keys: {valid}")
        if param.name in seen:
            raise UserError(f"{source}: '{key}' given twice (also as '{seen[param.name]}')")
        seen[param.name] = key
        try:
            value = _typed_value(param.type, raw)
        except ValueError:
            raise UserError(f"{source}: {key}={raw!r} is not a valid {_TYPE_NAMES[param.type]} "
                            f"({param.help}); valid keys: {valid}") from None
        if param.choices and value not in param.choices:
            raise UserError(f"{source}: {key}={raw!r} must be one of {', '.join(map(str, param.choices))}")
        if param.check is not None:
            problem = param.check(value)
            if problem:
                raise UserError(f"{source}: {key}={raw!r}: {problem}")
        if not param.modes:
            notes.append(f"user-defined parameter {key} is accepted and has no effect here ({param.help})")
        elif mode not in param.modes:
            notes.append(f"user-defined parameter {key} has no effect in --mode={mode}")
        values[param.name] = value
    return values, notes


def describe_params(app_name: str, params: Iterable[Param]) -> str:
    lines = [f"user_defined_parameters of app {app_name} (name / aliases (type, default; modes): meaning):"]
    lines += [param.describe() for param in params]
    return "\n".join(lines)


def peek_flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name`` in ``argv`` before full parsing (the app's --help needs the app name first)."""
    for i, token in enumerate(argv):
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def wants_help(argv: Sequence[str]) -> bool:
    return any(token in ("-h", "--help") for token in argv)
