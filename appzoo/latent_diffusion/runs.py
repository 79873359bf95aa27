"""A training run's identity in its ``--checkpoint_dir``: ``run.json`` records the settings that decide the result
(every flag and user-defined parameter but the few that only change how the run is watched or launched, plus a
digest of what each table holds) and whether the run finished.

Rerunning the identical command in that folder resumes an interrupted run from its last checkpoint (and says so) or,
for a finished one, says it is complete and does nothing; a different command there is an error naming what differs
and the choices: ``--resume_from_checkpoint`` (continue with the new settings), another folder, or
``overwrite_checkpoint_dir=True`` (start over)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_text, previous_folder
from easynlp_ldm.tables import split_tables, table_digest
from easynlp_ldm.training_state import META_FILE, STATE_DIR

logger = logging.getLogger("easynlp.train")

RUN_FILE = "run.json"
# Settings that change how a run is launched, watched or resumed, not what it computes.
NOT_THE_RESULT = frozenset({
    "mode", "user_defined_parameters", "resume_from_checkpoint", "checkpoint_dir", "logging_steps", "data_threads",
    "master_port", "master_addr", "node_rank", "local_rank", "collective_timeout", "distributed_backend",
    "overwrite_checkpoint_dir", "reset_model_state_flag", "memory_check", "memory_limit_gb", "sample_images",
    "sample_steps", "sample_time_share",
})


TABLE_CONTENTS = "table_contents"


def settings(flags: ParsedFlags, params: dict[str, Any]) -> dict[str, Any]:
    """What decides the run's result, as JSON values: table paths made absolute (a rerun from another directory is
    the same run) and what the tables hold (a digest of each one's bytes: a table changed since is another run;
    only touched, the same)."""
    values = {k: v for k, v in {**flags.values, **params}.items() if k not in NOT_THE_RESULT}
    if values.get("tables"):
        paths = [os.path.abspath(t) for t in split_tables(str(values["tables"]))]
        values["tables"] = ",".join(paths)
        values[TABLE_CONTENTS] = {path: table_digest(path) for path in paths}
    return json.loads(json.dumps(values, default=str, sort_keys=True))


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _step(out: str) -> int | None:
    state = os.path.join(out, STATE_DIR)
    meta = _read(os.path.join(state, META_FILE)) or _read(os.path.join(previous_folder(state), META_FILE))
    return int(meta["step"]) if meta and "step" in meta else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key) and key != TABLE_CONTENTS]
    before, now = old.get(TABLE_CONTENTS) or {}, new.get(TABLE_CONTENTS) or {}
    if not before and now:
        return changed + ["the contents of the tables (not recorded by the earlier run)"]
    return changed + [f"the contents of {path} changed" for path in now if path in before and before[path] != now[path]]


def decide(flags: ParsedFlags, params: dict[str, Any], overwrite: bool = False) -> str:
    """Before anything else is done: ``"new"`` (start from the pretrained model), ``"resume"`` (continue the
    interrupted identical run in --checkpoint_dir, or what --resume_from_checkpoint names) or ``"complete"`` (the
    identical run finished there: nothing to do). A different run in the folder is a ``UserError``. ``params``: the
    user-defined parameters as given (the run's identity); ``overwrite``: overwrite_checkpoint_dir."""
    out = flags.checkpoint_dir
    has_state = _step(out) is not None
    if flags.resume_from_checkpoint:
        return "resume"
    if overwrite:
        if has_state:
            logger.warning("overwrite_checkpoint_dir=True: starting over from the pretrained model in %s (its run is "
                           "replaced as this one saves)", out)
        return "new"
    recorded = _read(os.path.join(out, RUN_FILE))
    if not has_state:
        if recorded and recorded.get("settings") == settings(flags, params):
            logger.info("%s holds this run, stopped before its first checkpoint: starting it from step 0", out)
        return "new"
    if recorded is None or recorded.get("settings") != settings(flags, params):
        changed = differences(recorded.get("settings", {}), settings(flags, params)) if recorded else []
        what = (f"a run with other settings ({'; '.join(changed[:4])}{' …' if len(changed) > 4 else ''})"
                if changed else "a training run of another command")
        raise UserError(f"--checkpoint_dir={out} already holds {what}; pass --resume_from_checkpoint={out} to "
                        f"continue it with these settings, overwrite_checkpoint_dir=True to start over from the "
                        f"pretrained model, or choose another folder")
    if recorded.get("finished"):
        logger.info("%s holds this run, complete (%d steps): nothing to do. To train again, choose another folder or "
                    "pass overwrite_checkpoint_dir=True", out, _step(out))
        return "complete"
    logger.info("resuming the interrupted run in %s from its last checkpoint (step %d): the same command continues "
                "where it stopped", out, _step(out))
    return "resume"


def record(flags: ParsedFlags, params: dict[str, Any], finished: bool) -> None:
    """run.json, written atomically: at the start (unfinished) and at the end (finished)."""
    os.makedirs(flags.checkpoint_dir, exist_ok=True)
    atomic_write_text(os.path.join(flags.checkpoint_dir, RUN_FILE), json.dumps(
        {"settings": settings(flags, params), "finished": finished}, indent=1, sort_keys=True) + "\n")
