"""Where a model name points: never the network.

``pretrain_model_name_or_path`` / ``--checkpoint_dir`` resolve, in order, to
1. a local folder (absolute, or relative to the working directory, e.g. ``alibaba-pai/pai-diffusion-general-large-zh``
   when such a folder exists there), then the same relative path under ``--modelzoo_base_dir``;
2. an embedded model of this package, by name;
3. a Hugging Face cache entry already on disk, found by ``huggingface_hub.snapshot_download(local_files_only=True)``
   (which never opens a connection) in ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE`` and ``$HF_HOME/hub`` (default
   ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``), read when the lookup runs, not at import:
   a. the snapshot ``refs/main`` names, in any of these caches;
   b. else, when no cache has ``main`` (the model was fetched at another branch such as ``fp16`` or at a commit),
      the most recently written snapshot of the model: what the user downloaded last. huggingface_hub itself only
      resolves named revisions, so this toolkit picks that snapshot and has huggingface_hub check it;
   a snapshot that huggingface_hub knows to be incomplete (an interrupted download whose file listing, kept under
   ``trees/`` by huggingface_hub >= 1.22, names files the snapshot lacks) is an error, never replaced by an older one;
   without such a listing the folder is taken as it is;
4. EasyNLP's local model zoo, where EasyNLP itself unpacks a model name: ``$EASYNLP_CACHE_ROOT/modelzoo`` (default
   ``~/.easynlp/modelzoo``), at the path its name map ``modelzoo_alibaba.json`` (in that folder, or in the working
   directory, where EasyNLP reads it) gives, without ``.tgz``; else ``modelzoo/<name>``;
5. the ModelScope cache, where ``modelscope download --model <org>/<name>`` puts a model (Chinese users' hub), for a
   name of that form: under ``$MODELSCOPE_CACHE`` (default ``~/.cache/modelscope``), the folder the ModelScope SDK
   itself would reuse, in its order (``find_in_modelscope_cache``). It comes last so that every name the steps above
   resolve resolves to the same folder as before it was added (a model in both hubs is taken from the Hugging Face
   cache, as diffusers' own ``from_pretrained`` would): it only finds names that were not found. A download there
   that is not finished (files still in ModelScope's ``._____temp`` folder or named ``*.incomplete``, or neither
   ``model_index.json`` nor ``config.json``) is an error naming what is missing where, never taken silently;
otherwise a one-line error naming the model, the places looked in, and how to supply it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from easynlp_ldm.errors import UserError


def hf_cache_dirs() -> list[str]:
    """The Hub caches to search, read from the environment now (``huggingface_hub.constants`` reads it once)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    dirs = (os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE"), os.path.join(home, "hub"))
    return list(dict.fromkeys(os.path.expandvars(os.path.expanduser(d)) for d in dirs if d))


def find_in_hf_cache(repo_id: str, what: str = "model") -> str | None:
    """The snapshot folder of ``repo_id`` in a local HF cache (see the module docstring for which one), or None.

    An incomplete snapshot raises ``UserError``. Nothing here touches the network: ``local_files_only=True`` makes
    ``snapshot_download`` read ``refs/`` and ``snapshots/`` only, whatever ``HF_HUB_OFFLINE`` says.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)  # 'name' or 'namespace/name'; a path that is no folder is not a repo id either
    except HFValidationError:
        return None

    def snapshot(cache: str, revision: str) -> str | None:
        try:
            return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        except IncompleteSnapshotError as err:
            raise UserError(f"{what} '{repo_id}' is only partly in the Hugging Face cache ({err.snapshot_path} lacks "
                            f"files of its download) and this toolkit never downloads. Finish the download elsewhere "
                            f"(e.g. `hf download {repo_id} --local-dir DIR`), copy it here and pass the folder") \
                from None
        except LocalEntryNotFoundError:  # not cached at that revision
            return None

    caches = [cache for cache in hf_cache_dirs() if os.path.isdir(cache)]
    for cache in caches:
        found = snapshot(cache, "main")
        if found:
            return found
    newest: list[tuple[float, str, str]] = []
    for cache in caches:
        try:
            folder = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
            with os.scandir(folder) as entries:
                newest += [(e.stat().st_mtime, cache, e.name) for e in entries
                           if e.is_dir() and REGEX_COMMIT_HASH.fullmatch(e.name)]
        except OSError:
            continue
    if not newest:
        return None
    _, cache, commit = max(newest)
    return snapshot(cache, commit)


def resolve_model(name_or_path: str, embedded: Mapping[str, str] | None = None, modelzoo_base_dir: str = "",
                  what: str = "model") -> str:
    """Return a local folder for ``name_or_path`` or raise ``UserError``."""
    embedded = embedded or {}
    if not name_or_path:
        raise UserError(f"no {what} given")
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded) and not os.path.isdir(expanded):
        raise UserError(f"{what} '{name_or_path}' is a file, not a model folder; pass the folder that holds it")
    if modelzoo_base_dir:
        candidate = os.path.join(os.path.expanduser(modelzoo_base_dir), name_or_path)
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    if name_or_path in embedded:
        return embedded[name_or_path]
    cached = (find_in_hf_cache(name_or_path, what) or find_in_easynlp_modelzoo(name_or_path)
              or find_in_modelscope_cache(name_or_path, what))
    if cached:
        return cached
    known = f"; embedded models: {', '.join(sorted(embedded))}" if embedded else ""
    raise UserError(f"{what} '{name_or_path}' not found: no such local folder, embedded model, Hugging Face cache "
                    f"entry ({', '.join(hf_cache_dirs())}), EasyNLP model zoo folder ({easynlp_modelzoo_dir()}) or "
                    f"ModelScope cache entry ({modelscope_cache_dir()}), and this toolkit never downloads. "
                    f"Download it elsewhere (e.g. `hf download {name_or_path} --local-dir DIR` or `modelscope download "
                    f"--model {name_or_path} --local_dir DIR`), copy it here and pass the folder{known}")


def easynlp_modelzoo_dir() -> str:
    root = os.environ.get("EASYNLP_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".easynlp")
    return os.path.join(root, "modelzoo")


def find_in_easynlp_modelzoo(name: str) -> str | None:
    """The folder EasyNLP's ``get_pretrain_model_path`` would use for ``name``, when it exists on disk."""
    zoo = easynlp_modelzoo_dir()
    candidates = []
    for mapping_file in (os.path.join(zoo, "modelzoo_alibaba.json"), "modelzoo_alibaba.json"):
        try:
            with open(mapping_file, encoding="utf-8") as handle:
                mapping = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(mapping, dict) and isinstance(mapping.get(name), str):
            candidates.append(os.path.join(zoo, mapping[name].removesuffix(".tgz")))
    candidates.append(os.path.join(zoo, name))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None


# ModelScope keeps no refs and no file listing this toolkit may read (its `.msc` index is a pickle, never loaded here),
# so a download is judged by what its SDK leaves on disk while one runs, and by the files that make a folder a model.
MODEL_FILES = ("model_index.json", "config.json")  # a diffusers pipeline's index; a single model's or EasyNLP's config
MODELSCOPE_TEMP = "._____temp"  # SDK 1.2x-1.37: files wait in <models>/._____temp/<org>/<name> until verified
UNFINISHED_SUFFIXES = (".incomplete", ".parallel_tmp")  # modelscope-hub (SDK >= 1.38): a file still being written
MODELSCOPE_ID = re.compile(r"(?!\.)[\w.-]+/(?!\.)[\w.-]+")
MODELSCOPE_OWN_FOLDERS = {"hub", "models", "datasets"}  # folders of the cache itself, never an organisation


def modelscope_cache_dir() -> str:
    """ModelScope's cache root, read from the environment now: ``$MODELSCOPE_CACHE``, default ``~/.cache/modelscope``
    (SDKs before 1.38 wrote under its ``hub/`` by default, which ``find_in_modelscope_cache`` searches too)."""
    return os.path.expanduser(os.environ.get("MODELSCOPE_CACHE")
                              or os.path.join(os.path.expanduser("~"), ".cache", "modelscope"))


def find_in_modelscope_cache(model_id: str, what: str = "model") -> str | None:
    """The folder of ``<org>/<name>`` that the ModelScope SDK itself would reuse, or None; an unfinished download
    there raises ``UserError`` (never another copy instead).

    The SDK's layouts over its versions, in the order its latest (1.38+, on modelscope-hub) reuses them, under the root
    ``R`` (``modelscope_cache_dir()``), ``<safe>`` being the name with each ``.`` written ``___``:
    1. ``R/models/<org>/<safe>``, then ``R/hub/models/<org>/<safe>``: SDK 1.2x-1.37 (whose default root was ``R/hub``);
    2. ``R/models/<org>--<name>/snapshots/<revision>``: SDK 1.38+; ``master`` (its default), ``main``, else the most
       recently written snapshot, as for the Hugging Face cache;
    3. ``R/<org>/<name>``, ``R/<org>/<safe>``, ``R/hub/<org>/<name>``, ``R/hub/<org>/<safe>``,
       ``R/models/<org>/<name>``: SDKs before the ``models/`` folder.
    A folder counts when it holds anything, as for the SDK.
    """
    if not MODELSCOPE_ID.fullmatch(model_id):
        return None
    org, name = model_id.split("/")
    if org in MODELSCOPE_OWN_FOLDERS:
        return None
    safe = name.replace(".", "___")
    root = modelscope_cache_dir()
    hub = os.path.join(root, "hub")
    candidates = [(os.path.join(base, "models", org, safe), os.path.join(base, "models", MODELSCOPE_TEMP, org, name))
                  for base in (root, hub)]
    candidates.append((_newest_modelscope_snapshot(os.path.join(root, "models", f"{org}--{name}", "snapshots")), None))
    candidates += [(folder, None) for folder in (os.path.join(root, org, name), os.path.join(root, org, safe),
                                                 os.path.join(hub, org, name), os.path.join(hub, org, safe),
                                                 os.path.join(root, "models", org, name))]
    found = next(((folder, temp) for folder, temp in candidates if folder and _has_entries(folder)), None)
    if found is None:
        return None
    unfinished = _unfinished_download(*found)
    if unfinished:
        raise UserError(f"{what} '{model_id}' is only partly in the ModelScope cache: {unfinished}, and this toolkit "
                        f"never downloads. Finish the download (`modelscope download --model {model_id}` resumes it) "
                        f"or pass a complete model folder")
    return os.path.abspath(found[0])


def _has_entries(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:  # absent, or not a folder
        return False


def _files_under(folder: str) -> list[str]:
    return [os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names]


def _newest_modelscope_snapshot(snapshots: str) -> str | None:
    try:
        with os.scandir(snapshots) as entries:
            revisions = {entry.name: entry.path for entry in entries if entry.is_dir() and _has_entries(entry.path)}
    except OSError:
        return None
    for default in ("master", "main"):
        if default in revisions:
            return revisions[default]
    return max(revisions.values(), key=os.path.getmtime, default=None)


def _unfinished_download(folder: str, temp: str | None) -> str | None:
    """What shows the download in ``folder`` unfinished, in words, or None when it looks complete."""
    waiting = _files_under(temp) if temp else []
    if waiting:
        return f"{len(waiting)} file(s) of it still wait in {temp}, where the ModelScope SDK keeps them until complete"
    partial = [path for path in _files_under(folder) if path.endswith(UNFINISHED_SUFFIXES)]
    if partial:
        return f"{partial[0]} is still being written"
    if not any(os.path.isfile(os.path.join(folder, marker)) for marker in MODEL_FILES):
        return f"{folder} has neither {' nor '.join(MODEL_FILES)}"
    return None
