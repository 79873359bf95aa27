"""The ``easynlp`` command: parse flags → the app found by its registration (easynlp_ldm/apps.py) → the app's mode.

A user's mistake (``UserError``) is printed as one line on stderr with exit status 2; anything else keeps its
traceback because it is a bug.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from easynlp_ldm import apps, threads
from easynlp_ldm.args import (
    ParsedFlags,
    describe_params,
    parse_flags,
    parse_user_defined_parameters,
    peek_flag,
    wants_help,
)
from easynlp_ldm.errors import UserError

logger = logging.getLogger("easynlp")


@dataclass
class Command:
    """Everything a mode needs: the flags and the typed user-defined parameters of the chosen app."""

    app_name: str
    mode: str
    flags: ParsedFlags
    params: dict[str, Any]
    notes: list[str]


def parse_command(argv: Sequence[str]) -> Command:
    argv = list(argv)
    app_name = peek_flag(argv, "--app_name") or "latent_diffusion"
    app_help = ""
    if wants_help(argv):
        app_help = describe_params(app_name, apps.get_params(app_name)) if app_name in apps.registered() else ""
    flags = parse_flags(argv, app_help)
    app_name = flags.app_name
    params_spec = apps.get_params(app_name)
    params, notes = parse_user_defined_parameters(flags.user_defined_parameters, params_spec, flags.mode, app_name)
    return Command(app_name=app_name, mode=flags.mode, flags=flags, params=params, notes=flags.notes + notes)


def seed_everything(seed: int) -> None:
    """``--random_seed``: python's, numpy's and torch's global generators (CUDA's too), the same in every process
    as EasyNLP did. Called as a mode starts; everything that must not depend on the world size draws from its own
    generator seeded from (seed, epoch, sample) anyway."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_command(command: Command, argv: Sequence[str] = ()) -> int:
    from easynlp_ldm import distributed

    flags = command.flags
    if distributed.wants_launch(flags):
        if command.mode not in ("train", "predict"):
            raise UserError(f"--worker_gpu/--worker_count run several processes for train and predict only, not "
                            f"--mode={command.mode}")
        return distributed.launch(flags, list(argv))
    for note in command.notes:
        if not distributed.launched_by_launcher() or os.environ.get("RANK") == "0":
            logger.warning(note)
    if distributed.launched_by_launcher():
        distributed.die_with_launcher()
        distributed.init_from_env(flags.distributed_backend, flags.collective_timeout,
                                  explicit="distributed_backend" in flags.given)
    seed_everything(flags.random_seed)
    app_class = apps.get_app_class(command.app_name)
    app = app_class(command.flags, command.params)
    try:
        return app.run(command.mode) or 0
    finally:
        distributed.shutdown()


class _TqdmWriteHandler(logging.StreamHandler):
    """A console handler that prints through ``tqdm.write``: the line goes above any live progress bar (which is
    redrawn below it) instead of being glued onto the bar's line. Same stream, level, format and filters as the
    handler it stands in for."""

    def __init__(self, original: logging.StreamHandler):
        super().__init__(original.stream)
        self.setLevel(original.level)
        self.setFormatter(original.formatter)
        self.filters = list(original.filters)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _is_console_handler(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and handler.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


@contextlib.contextmanager
def log_above_progress_bars() -> Iterator[None]:
    """While a mode runs, the console handlers of the root and ``easynlp*`` loggers write through ``tqdm.write``
    (tqdm's ``logging_redirect_tqdm``, without its extra handler where a logger has none: nothing new is printed);
    the original handlers are put back afterwards."""
    loggers = [logging.getLogger()] + [
        log for name, log in list(logging.Logger.manager.loggerDict.items())
        if name.startswith("easynlp") and isinstance(log, logging.Logger)]
    saved = []
    for log in loggers:
        if any(_is_console_handler(h) and not isinstance(h, _TqdmWriteHandler) for h in log.handlers):
            saved.append((log, log.handlers))
            log.handlers = [_TqdmWriteHandler(h) if _is_console_handler(h) and not isinstance(h, _TqdmWriteHandler)
                            else h for h in log.handlers]
    try:
        yield
    finally:
        for log, handlers in saved:
            log.handlers = handlers


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=os.environ.get("EASYNLP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        command = parse_command(argv)
        threads.configure(command.flags.worker_cpu)  # before torch loads: OpenMP reads its settings then
        with log_above_progress_bars():
            return run_command(command, argv)
    except UserError as err:
        print(f"easynlp: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("easynlp: interrupted", file=sys.stderr, flush=True)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
