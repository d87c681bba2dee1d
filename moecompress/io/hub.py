"""Push a compressed checkpoint to the Hugging Face Hub with a generated model card.

Design choices (why):
- One ``create_commit`` with every file plus the card as in-memory bytes: the repo gets the
  checkpoint and its README atomically, and the user's folder is never written to (no staging copy
  of multi-GB weights either). ``upload_folder`` cannot add a file that is not on disk.
- A README.md already in the folder is the user's card and is uploaded unchanged.
- The token is never printed: every error message that leaves this module has it scrubbed.
- huggingface_hub is imported lazily so `moecompress --help` and other commands stay fast.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from moecompress.errors import UserError
from moecompress.io.model_card import looks_like_hub_id

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_LOGIN_HINT = "run `hf auth login`, or pass --token, or set HF_TOKEN"


def validate_repo_id(repo_id: str) -> None:
    """``owner/name`` in the Hub's alphabet; we require the owner so a push never lands somewhere unexpected."""
    parts = repo_id.split("/")
    ok = (
        len(parts) == 2
        and all(_NAME.match(p) for p in parts)
        and len(parts[1]) <= 96
        and ".." not in repo_id
        and "--" not in repo_id
        and not parts[1].endswith(".git")
    )
    if not ok:
        raise UserError(
            f"invalid repo id {repo_id!r}: use OWNER/NAME (letters, digits, '.', '_', '-'; no '--' or '..'; "
            "name up to 96 characters), e.g. --repo alice/qwen3-moe-pruned"
        )


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """Files to upload, relative to the folder; hidden files and folders (.git, .cache, ...) stay local."""
    out = []
    for root, dirs, files in os.walk(checkpoint_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                out.append((Path(root) / f).relative_to(checkpoint_dir))
    return out


def validate_checkpoint(checkpoint_dir: Path) -> None:
    """A pushable checkpoint has a readable config.json and complete weights (every indexed shard present)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a folder; pass the checkpoint folder written by moecompress (config.json + weights)")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise UserError(f"{d} has no config.json; is it a HuggingFace checkpoint folder?")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{cfg} is not valid JSON ({exc}); the checkpoint looks damaged") from None
    if not any(p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) for p in d.iterdir()):
        raise UserError(f"{d} has a config.json but no weight files (*.safetensors / *.bin); nothing to push")
    for index_name in _INDEX_FILES:
        index = d / index_name
        if not index.is_file():
            continue
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, OSError, AttributeError) as exc:
            raise UserError(f"{index} is not a valid weight index ({exc})") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise UserError(f"{d} is incomplete: {index_name} lists missing shard(s) {', '.join(missing[:5])}")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _first_lines(exc: BaseException, n: int = 3) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:n]) if lines else type(exc).__name__


def _as_user_error(exc: BaseException, repo_id: str, endpoint: str, token: str | None) -> UserError | None:
    """Translate network/auth/Hub failures into one actionable line; None means 'not ours, re-raise'."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    owner = repo_id.split("/")[0]
    if isinstance(exc, OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set, so nothing can be pushed; unset it for this command"
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        detail = exc.server_message or _first_lines(exc)
        if status == 401:
            msg = f"not logged in or the token was rejected by {endpoint} ({detail}): {_LOGIN_HINT}"
        elif status == 403:
            msg = f"the token may not write to '{owner}' on {endpoint} ({detail}); use a token with write access"
        elif isinstance(exc, RepositoryNotFoundError):
            msg = f"repository {repo_id} not found or not writable with this token ({detail})"
        elif status is not None and status >= 500:
            msg = f"the Hub at {endpoint} failed with HTTP {status} ({detail}); try again later"
        else:
            msg = f"the Hub at {endpoint} refused the upload to {repo_id}: HTTP {status} ({detail})"
    elif isinstance(exc, httpx2.TransportError):
        msg = f"could not reach {endpoint} ({type(exc).__name__}: {_first_lines(exc, 1)}); check the network or HF_ENDPOINT"
    elif isinstance(exc, ConnectionError):  # hf_xet reports storage-side network failures this way
        msg = (
            f"uploading to the Hub's file storage failed ({_first_lines(exc, 2)}); check the network/firewall, "
            "or set HF_HUB_DISABLE_XET=1 to upload through the older LFS protocol"
        )
    elif isinstance(exc, ValueError) and "README.md" in str(exc):
        msg = f"the Hub rejected the model card metadata: {_first_lines(exc, 5)}"
    elif isinstance(exc, RuntimeError) and "uploading" in str(exc) and exc.__cause__ is not None:
        msg = f"{_first_lines(exc, 1)} {_first_lines(exc.__cause__, 2)}"
    else:
        return None
    return UserError(_scrub(msg, token))


def _card_bytes(checkpoint_dir: Path, repo_id: str, base_model: str | None) -> bytes:
    from moecompress.io.model_card import build_model_card

    return str(build_model_card(checkpoint_dir, repo_id, base_model=base_model)).encode("utf-8")


def _operations(checkpoint_dir: Path, repo_id: str, base_model: str | None) -> list[CommitOperationAdd]:
    from huggingface_hub import CommitOperationAdd

    files = checkpoint_files(checkpoint_dir)
    ops = [CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(checkpoint_dir / rel)) for rel in files]
    if Path("README.md") not in files:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_card_bytes(checkpoint_dir, repo_id, base_model)))
    return ops


def push_checkpoint(
    checkpoint_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
) -> str:
    """Create (or reuse) ``repo_id`` and upload the checkpoint plus a model card in one commit; returns the repo URL.

    Validates everything local first (folder, repo id, login), so mistakes fail before any network use.
    With ``private=True`` an existing *public* repo is refused instead of silently publishing the model.
    """
    checkpoint_dir = Path(checkpoint_dir)
    validate_checkpoint(checkpoint_dir)
    validate_repo_id(repo_id)
    if base_model is not None and not looks_like_hub_id(base_model, check_local=False):
        raise UserError(f"--base-model must be a Hub model id OWNER/NAME, got {base_model!r}")

    from huggingface_hub import HfApi, constants, get_token

    import moecompress

    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it for this command")
    try:
        token = token or get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange; its message may carry secrets
        raise UserError(f"could not read the Hugging Face token ({type(exc).__name__}): {_LOGIN_HINT}") from None
    if not token:
        raise UserError(f"not logged in to the Hugging Face Hub: {_LOGIN_HINT}")

    api = HfApi(token=token)
    ops = _operations(checkpoint_dir, repo_id, base_model)
    message = commit_message or f"Upload compressed checkpoint (moecompress {moecompress.__version__})"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise UserError(
                f"{repo_id} already exists and is public; --private would not hide it. Make it private on the "
                "Hub first, or push without --private"
            )
        api.create_commit(repo_id, operations=ops, commit_message=message)
    except UserError:
        raise
    except Exception as exc:
        err = _as_user_error(exc, repo_id, api.endpoint, token)
        if err is not None:
            raise err from None
        if token in str(exc):  # unexpected error: keep its type and message, never the secret
            raise RuntimeError(f"{type(exc).__name__}: {_scrub(str(exc), token)}") from None
        raise
    return str(url)


def push_command(
    dir: Path = typer.Argument(..., help="Checkpoint folder to upload (config.json + weights)."),
    repo: str = typer.Option(..., "--repo", help="Target repository, OWNER/NAME; created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", show_envvar=True,
        help="Hugging Face token with write access (default: the one saved by `hf auth login`).",
    ),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Hub id of the original model for the card, if moecompress.json records a local path.",
    ),
) -> None:
    """Upload a checkpoint to the Hugging Face Hub with a generated model card (README.md)."""
    validate_checkpoint(dir)
    validate_repo_id(repo)
    files = checkpoint_files(dir)
    size = sum((dir / f).stat().st_size for f in files)
    typer.echo(f"pushing {len(files)} files ({size / 1e6:.1f} MB) from {dir} to {repo} ...", err=True)
    url = push_checkpoint(dir, repo, private=private, token=token, commit_message=message, base_model=base_model)
    typer.echo(url)
