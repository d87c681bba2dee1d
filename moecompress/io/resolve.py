"""Model arguments are local folders or Hub ids: resolve ids to a snapshot in the Hugging Face cache.

`huggingface_hub.snapshot_download` does the work, so `HF_HOME`, `HF_TOKEN` (or `hf auth login`),
`HF_HUB_OFFLINE` and `HF_ENDPOINT` behave as in every other HF tool, downloads resume after an interruption
(`.incomplete` files are continued on the next run), and a warm cache works offline. Only the files a step needs
are fetched: `inspect` and `plan` read `config.json` alone; passes and `eval` also need weights and tokenizer.
Every failure becomes one `UserError` line that says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moecompress.errors import UserError
from moecompress.io.model_card import looks_like_hub_id

Needs = Literal["config", "weights"]
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
# Top-level files a checkpoint is made of; subfolders (gpt-oss `original/`, `metal/`) hold other formats.
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model argument lives on disk, and which Hub repo and commit it came from (None when local)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # what the user asked for (branch, tag or commit)
    commit: str | None = None  # the commit it resolved to

    @property
    def label(self) -> str:
        """How reports and plans name the model: `owner/name@commit` for Hub ids, else the folder."""
        return f"{self.repo_id}@{self.commit[:12]}" if self.repo_id and self.commit else str(self.path)

    def hub_ref(self) -> dict[str, str] | None:
        if not self.repo_id:
            return None
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit or ""}


def is_hub_id(model: str | Path) -> bool:
    """`owner/name` that is not an existing local path."""
    return looks_like_hub_id(str(model), check_local=True)


def resolve_model(model: str | Path, *, revision: str | None = None, needs: Needs = "weights") -> ResolvedModel:
    """A local folder as is; a Hub id downloaded (only what `needs` asks for) into the HF cache."""
    text = str(model)
    if not is_hub_id(text):
        if revision is not None and Path(text).exists():
            raise UserError(f"--revision {revision} applies to Hub ids; {text} is a local folder")
        return ResolvedModel(path=Path(text))
    return _download(text, revision, needs)


def _download(repo_id: str, revision: str | None, needs: Needs) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    patterns = ["config.json"] if needs == "config" else _WEIGHT_PATTERNS
    offline = constants.is_offline_mode()
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its per-retry warnings would bury our one-line message
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   ignore_patterns=["*/*"] if needs != "config" else None)
    except Exception as exc:
        err = _as_user_error(exc, repo_id, revision, offline)
        if err is None:
            raise
        raise err from None
    finally:
        hub_logging.set_verbosity(level)
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{repo_id}{_at(revision)} has no config.json; is it a transformers model repository?")
    if needs == "weights" and not any(p.suffix == ".safetensors" for p in path.iterdir()):
        if offline:
            raise UserError(f"HF_HUB_OFFLINE is set and the cache ({constants.HF_HUB_CACHE}) holds only part of "
                            f"{repo_id}{_at(revision)} (no weights); run once without HF_HUB_OFFLINE to download it")
        raise UserError(f"{repo_id}{_at(revision)} has no *.safetensors weights at its top level; moecompress reads "
                        "safetensors checkpoints")
    return ResolvedModel(path=path, repo_id=repo_id, revision=revision, commit=path.name)


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""


def _as_user_error(exc: BaseException, repo_id: str, revision: str | None, offline: bool) -> UserError | None:
    """One actionable line for every way a download fails; None for errors that are not about the download."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its conditions on {endpoint}/{repo_id} and {_LOGIN_HINT} "
                         "(a token of the account that has access)")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"revision {revision!r} does not exist in {repo_id}; use a branch, tag or commit of that "
                         "repository (or drop --revision for main)")
    if isinstance(exc, RepositoryNotFoundError):
        logged_in = bool(os.environ.get("HF_TOKEN")) or _has_saved_token()
        hint = "check the spelling" + ("" if logged_in else f", or {_LOGIN_HINT} if it is private")
        return UserError(f"model {repo_id} was not found on {endpoint} and is not a local folder; {hint}")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or (offline and isinstance(exc, OSError)):
        if offline:
            cached = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
            if cached.is_dir() and any(cached.iterdir()):
                return UserError(f"HF_HUB_OFFLINE is set and the cache ({constants.HF_HUB_CACHE}) holds only part of "
                                 f"{repo_id}{_at(revision)} (e.g. the config.json `inspect` fetched, not the "
                                 "weights); run once without HF_HUB_OFFLINE to download the rest")
            return UserError(f"HF_HUB_OFFLINE is set and {repo_id}{_at(revision)} is not in the cache "
                             f"({constants.HF_HUB_CACHE}); run once without HF_HUB_OFFLINE, or check HF_HOME")
        return UserError(f"could not download {repo_id}{_at(revision)} from {endpoint} and it is not cached: "
                         f"{_first_line(exc)}; check the network or HF_ENDPOINT")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return UserError(f"{endpoint} refused access to {repo_id} (HTTP {status}): {_LOGIN_HINT}")
        return UserError(f"downloading {repo_id} from {endpoint} failed with HTTP {status} "
                         f"({exc.server_message or _first_line(exc)}); try again — a rerun resumes")
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return UserError(f"downloading {repo_id} from {endpoint} was interrupted ({type(exc).__name__}: "
                         f"{_first_line(exc)}); run the command again — the download resumes where it stopped")
    if isinstance(exc, ValueError) and "revision" in str(exc).lower():
        return UserError(f"{repo_id}: {_first_line(exc)}")
    return None


def _has_saved_token() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # an OIDC exchange may fail; treat as not logged in
        return False


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__
