"""Where a model name points: never the network.

``pretrain_model_name_or_path`` / ``--checkpoint_dir`` resolve, in order, to
1. a local folder (absolute, or relative to the working directory, e.g. ``alibaba-pai/pai-diffusion-general-large-zh``
   when such a folder exists there), then the same relative path under ``--modelzoo_base_dir``;
2. an embedded model of this package, by name;
3. a Hugging Face cache entry already on disk (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``);
otherwise a one-line error naming the model and saying how to supply it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from easynlp_ldm.errors import UserError


def hf_cache_dirs() -> list[str]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        dirs.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    dirs.append(os.path.join(hf_home, "hub"))
    return dirs


def find_in_hf_cache(repo_id: str) -> str | None:
    """The snapshot folder of ``repo_id`` in a local HF cache: the one ``refs/main`` names, else the newest."""
    if repo_id.count("/") != 1:
        return None
    folder_name = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        repo_dir = os.path.join(cache, folder_name)
        snapshots = os.path.join(repo_dir, "snapshots")
        if not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo_dir, "refs", "main")
        if os.path.isfile(ref):
            with open(ref, encoding="utf-8") as handle:
                candidate = os.path.join(snapshots, handle.read().strip())
            if os.path.isdir(candidate):
                return candidate
        entries = [os.path.join(snapshots, e) for e in os.listdir(snapshots)]
        entries = [e for e in entries if os.path.isdir(e)]
        if entries:
            return max(entries, key=os.path.getmtime)
    return None


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
    cached = find_in_hf_cache(name_or_path)
    if cached:
        return cached
    known = f"; embedded models: {', '.join(sorted(embedded))}" if embedded else ""
    raise UserError(f"{what} '{name_or_path}' not found: no such local folder, embedded model or Hugging Face cache "
                    f"entry, and this toolkit never downloads. Download it elsewhere (e.g. `huggingface-cli download "
                    f"{name_or_path} --local-dir DIR`), copy it here and pass the folder{known}")
