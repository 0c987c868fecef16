"""Hugging Face Hub model ids (`org/name[@revision]`) resolved to a snapshot dir of the HF cache.

The cache is huggingface_hub's own (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub),
read at call time so a changed environment is honoured. With `HF_HUB_OFFLINE=1`, or when the Hub
endpoint does not accept a connection, only the cache is looked at; otherwise `config.json` is fetched first (a model that asks for remote code is refused
before any weights are downloaded), then the snapshot, limited to safetensors weights, JSON configs
and tokenizer files (pickled `.bin` weights are never downloaded). Every failure is one UserError line.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from lmprune.errors import UserError
from lmprune.trust import read_json_object, refuse_remote_code

# What a causal LM needs: configs, its safetensors weights (model*.safetensors: not e.g. a Mistral repo's
# second consolidated.safetensors copy), tokenizer files, chat template.
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9._/-]+))?")
_TRUE = {"1", "on", "yes", "true"}


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `name` is spelled `org/name[@revision]`, else None."""
    match = HUB_ID.fullmatch(name)
    if match is None or ".." in match["repo"] or match["repo"].endswith("."):
        return None
    return match["repo"], match["revision"]


def hub_cache_dir() -> Path:
    """The HF hub cache this process uses now (environment read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_hub_model(name: str) -> Path:
    """The snapshot dir of Hub model `name` (`org/name[@revision]`), from the cache or downloaded."""
    parsed = parse_hub_id(name)
    if parsed is None:
        raise UserError(f"{name!r} is not a Hub model id (org/name[@revision])")
    repo_id, revision = parsed
    cache, offline = hub_cache_dir(), hub_offline()
    reachable = not offline and _hub_reachable()
    try:
        if reachable:
            _refuse_remote_config(repo_id, revision, cache)
        return Path(_snapshot(repo_id, revision, cache, local_only=not reachable))
    except UserError:
        raise
    except Exception as error:  # huggingface_hub raises its own errors, OSError and httpx errors
        raise UserError(_describe(error, name, cache, offline)) from None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub endpoint: without it, huggingface_hub retries each request with
    back-off (~25 s of warnings) before falling back to the cache. Behind a proxy the probe is skipped."""
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _snapshot(repo_id: str, revision: str | None, cache: Path, local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=local_only,
                             allow_patterns=ALLOW_PATTERNS)


def _refuse_remote_config(repo_id: str, revision: str | None, cache: Path) -> None:
    """Fetch config.json alone (cheap) and refuse remote code before the weights are downloaded."""
    from huggingface_hub import hf_hub_download

    config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache))
    refuse_remote_code(config_file.parent, read_json_object(config_file))


def _describe(error: Exception, name: str, cache: Path, offline: bool) -> str:
    """One line for a failed Hub resolution, naming the id and what to do."""
    from huggingface_hub import errors

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, errors.GatedRepoError):
        return f"Hub model {name}: the repo is gated; accept its terms on the Hub and log in (`hf auth login`)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"Hub model {name}: no such repo on the Hugging Face Hub (a typo? a private repo needs "
                "`hf auth login`), and no local dir of that name")
    if isinstance(error, errors.RevisionNotFoundError):
        return f"Hub model {name}: no such revision on the Hub"
    if isinstance(error, errors.IncompleteSnapshotError):
        return f"Hub model {name}: the cached snapshot in {cache} is incomplete; download it again with network access"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return f"Hub model {name}: the repo has no config.json (not a transformers model)"
    if isinstance(error, errors.HFValidationError):
        return f"{name!r} is not a valid Hub model id: {first}"
    if isinstance(error, errors.LocalEntryNotFoundError):
        if offline:
            return (f"Hub model {name} is not in the HF cache {cache} (revision {_revision(name)}), and "
                    "HF_HUB_OFFLINE=1 forbids downloading it; no local dir of that name either")
        return (f"Hub model {name}: the Hub ({hub_endpoint()}) cannot be reached and the model is not in the HF cache {cache}; "
                "no local dir of that name either")
    return f"Hub model {name}: {type(error).__name__}: {first}"


def _revision(name: str) -> str:
    parsed = parse_hub_id(name)
    return (parsed[1] if parsed and parsed[1] else "main")
