"""Hugging Face hub ids (``org/name[@revision]``) as inputs, and uploading a merged folder to the hub.

Inputs: ``looks_like_hub_id`` says whether a base or expert reference is written like a hub id (a local
path that exists always wins; ``io/inputs.py`` checks that). ``resolve_hub_id`` downloads the files a
model folder needs (weights, config, tokenizer, generation config) with ``huggingface_hub.snapshot_download``
into the standard hub cache and returns the snapshot folder, whose name is the commit; offline
(``HF_HUB_OFFLINE=1``, or the hub cannot be reached) it only looks in the cache. ``resolve`` also returns
what the model card records: the id as given, the repo, the revision asked and the commit resolved.

Output: ``check_push_ready`` runs before any merge work (offline, no token, a read-only or invalid token,
the hub unreachable: one line each); ``push_folder`` creates the repo (``exist_ok``) and uploads the
finished output folder, model card included.

``huggingface_hub`` is imported inside the functions: the command line starts without it.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from layermerge.errors import CheckpointError, OutputError

# One repo-name part: letters, digits, '-', '_', '.'; starting and ending with a letter, digit or '_'
# (the hub's own rule, as are "no '--' or '..'" and at most 96 characters).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO = re.compile(rf"{_PART}/{_PART}")
_REVISION = re.compile(r"[A-Za-z0-9_.\-/]+")       # a branch, a tag, a commit or refs/pr/N
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A name ending like a weights or config file is a local path the user mistyped, not a repo.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".yaml", ".yml", ".npz")

# What a model folder needs; pytorch_model*.bin only when a revision has no safetensors (both would
# double the download).
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
BIN_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]

PREFLIGHT_TIMEOUT_S = 10.0          # how long the hub may take to answer whoami before a merge starts


@dataclass(frozen=True)
class HubInput:
    """A base or expert given as a hub id: what the model card and the record show about it."""

    given: str              # as the user wrote it: org/name or org/name@revision
    repo: str
    revision: str | None    # as asked; None: the repo's default branch
    commit: str             # the commit the revision resolved to (the snapshot folder's name)
    folder: Path            # the snapshot folder in the hub cache

    def card_text(self) -> str:
        return f"`{self.given}` from the Hugging Face hub at commit `{self.commit}`"


def split_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo, revision or None)`` when ``text`` is written like a hub id, else None."""
    if not text or text[0] in "./~\\" or any(c.isspace() for c in text):
        return None
    repo, at, revision = text.partition("@")
    if at and not _REVISION.fullmatch(revision):
        return None
    if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo:
        return None
    if repo.lower().endswith(_FILE_SUFFIXES):
        return None
    return repo, (revision if at else None)


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``org/name@revision``; a local path that exists wins (checked by the caller)."""
    return split_hub_id(str(text)) is not None


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub reads it once, at import."""
    from huggingface_hub import constants

    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")) or bool(
        constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    """The hub cache folder as the environment sets it now: HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def resolve(text: str, role: str | None = None) -> HubInput:
    """Download (or, offline, find in the cache) the model folder of hub id ``text``."""
    parts = split_hub_id(text)
    if parts is None:
        raise CheckpointError(f"{role or 'model'} {text!r} is not a hub id (org/name or org/name@revision)")
    repo, revision = parts
    what = f"{role or 'model'} {text!r}"
    cache = hub_cache()
    offline = is_offline()
    folder = _snapshot(repo, revision, cache, what, offline)
    if not _has_safetensors(folder) and not offline:
        folder = _snapshot(repo, revision, cache, what, offline, patterns=ALLOW_PATTERNS + BIN_PATTERNS)
    return HubInput(given=text, repo=repo, revision=revision, commit=folder.name, folder=folder)


def resolve_hub_id(text: str, role: str | None = None) -> Path:
    """The local snapshot folder (named by its commit) of hub id ``text``; see ``resolve``."""
    return resolve(text, role).folder


def _snapshot(repo: str, revision: str | None, cache: Path, what: str, offline: bool,
              patterns: list[str] = ALLOW_PATTERNS) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    def download(local_only: bool) -> Path:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                      local_files_only=local_only))

    at = f" at revision {revision!r}" if revision else ""
    page = f"{constants.ENDPOINT}/{repo}"
    if not offline and revision is not None and _COMMIT.fullmatch(revision):
        try:                # a commit never changes: its complete cached snapshot needs no network
            return download(local_only=True)
        except Exception:
            pass
    try:
        return download(local_only=offline)
    except hub_errors.IncompleteSnapshotError as exc:
        # The cached listing names files this snapshot lacks (say, a tokenizer file never fetched): use
        # what is there; the reader says clearly if a weights file is missing.
        if exc.snapshot_path and Path(exc.snapshot_path).is_dir():
            return Path(exc.snapshot_path)
        reason = _one_line(exc)
    except hub_errors.GatedRepoError:
        raise CheckpointError(f"{what}: {repo} is a gated repo on the hub: accept its conditions at {page} and log "
                              "in (hf auth login, or set HF_TOKEN) with that account") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{what}: no model repo {repo} on the hub ({page}), or it is private and your token "
                              "cannot see it: check the id, log in (hf auth login, or set HF_TOKEN), or pass a local "
                              "model folder instead") from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"{what}: {repo} has no revision {revision!r} (a branch, tag or commit); "
                              f"see {page}/commits") from None
    except hub_errors.LocalEntryNotFoundError as exc:
        cause = _one_line(exc.__cause__ or exc)
        reason = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({cause})"
    except hub_errors.HfHubHTTPError as exc:
        raise CheckpointError(f"{what}: the hub refused the download of {repo}: {_one_line(exc)}") from None
    except Exception as exc:     # the network failed in a way huggingface_hub passed on (proxy, TLS...)
        if offline:
            raise CheckpointError(f"{what}: cannot read the hub cache {cache}: {_one_line(exc)}") from None
        try:
            return download(local_only=True)
        except Exception:
            reason = f"the hub could not be reached ({_one_line(exc)})"
    online = ("unset HF_HUB_OFFLINE to download it into the cache" if offline else
              "check the network: online it is downloaded into the cache")
    raise CheckpointError(
        f"{what} is not a local path, and {repo}{at} is not in the Hugging Face hub cache {cache} while {reason}: "
        "pass a local model folder instead (a folder with config.json and model.safetensors; relative paths are "
        f"relative to the config file), or {online}")


# ----------------------------------------------------------------------------- pushing to the hub
_verified_tokens: set[tuple[str, str]] = set()


def _call_with_timeout(function, seconds: float):
    """``function()``, or TimeoutError after ``seconds`` (huggingface_hub's session has no timeout)."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = function()
        except BaseException as exc:     # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="layermerge-hub-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_push_ready(repo: str, token: str | None = None) -> str:
    """Before any merge work: the repo id is valid, the hub is not switched off, a token is there and the
    hub accepts it (within PREFLIGHT_TIMEOUT_S). Returns the token; raises OutputError with one line."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    name = str(repo)
    if "@" in name or not (_REPO.fullmatch(name) or re.fullmatch(_PART, name)) or "--" in name or ".." in name:
        raise OutputError(f"push_to_hub: {repo!r} is not a hub repo id; give org/name (or a name in your "
                          "own namespace)")
    if is_offline():
        raise OutputError(f"cannot push to the hub repo {repo}: HF_HUB_OFFLINE is set; unset it, or drop "
                          "--push-to-hub (push_to_hub) and upload the output folder later with: hf upload "
                          f"{repo} OUTPUT_FOLDER")
    token = token or huggingface_hub.get_token()
    if not token:
        raise OutputError(f"cannot push to the hub repo {repo}: no Hugging Face token; log in with "
                          "'hf auth login' or set HF_TOKEN to a token with write access")
    endpoint = constants.ENDPOINT
    if (endpoint, token) in _verified_tokens:
        return token
    try:
        info = _call_with_timeout(lambda: huggingface_hub.HfApi(endpoint=endpoint).whoami(token=token),
                                  PREFLIGHT_TIMEOUT_S)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise OutputError(f"cannot push to the hub repo {repo}: {endpoint} rejected the token (invalid or "
                              "expired); log in again with 'hf auth login' or set HF_TOKEN") from None
        raise OutputError(f"cannot push to the hub repo {repo}: {endpoint} answered {_one_line(exc)}") from None
    except Exception as exc:     # connection refused, DNS, proxy, timeout: httpx's errors are not OSErrors
        raise OutputError(f"cannot push to the hub repo {repo}: {endpoint} cannot be reached ({_one_line(exc)}); "
                          "check the network (or HF_ENDPOINT), or drop --push-to-hub and upload the output "
                          "later") from None
    role = (((info or {}).get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(info, dict) else None
    if role == "read":
        raise OutputError(f"cannot push to the hub repo {repo}: the Hugging Face token is read-only; create a "
                          "token with write access and log in with it ('hf auth login' or HF_TOKEN)")
    _verified_tokens.add((endpoint, token))
    return token


def push_folder(folder: str | Path, repo: str, private: bool = False, token: str | None = None,
                commit_message: str | None = None, kept: bool = True) -> str:
    """Create ``repo`` (a model repo; kept if it exists) and upload ``folder`` to it. Returns the repo's URL.
    ``kept``: the folder stays after this (an output folder, not a temporary one), so an error says how to
    upload it later."""
    import huggingface_hub
    from huggingface_hub import constants

    folder = Path(folder)
    token = check_push_ready(repo, token)
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or "Upload merged model (layermerge)")
    except Exception as exc:     # HTTP errors (403: no write access to the org), network errors
        later = f"; the folder is unchanged, upload it later with: hf upload {repo} {folder}" if kept else ""
        raise OutputError(f"uploading the merged model to the hub repo {repo} failed: {_one_line(exc)}{later}") \
            from None
    return str(url) if url else f"{constants.ENDPOINT}/{repo}"
