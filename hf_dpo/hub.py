"""Publish a run's output_dir to the Hugging Face Hub: the adapter, tokenizer, model card and results only.

What is pushed is decided here, not by what happens to lie in the folder: only the top-level files that
match PUSH_PATTERNS go up; optimizer and scheduler states, RNG states, training_args.bin and the
checkpoint-* folders never do. Before anything is sent, every file to be pushed is scanned for the token,
and a push that would publish it is refused.

Uploads go through the Hub's plain HTTP + Git LFS protocol (preupload, LFS batch, PUT, commit), with xet
switched off for the duration of the push: an adapter is small enough that xet's chunk deduplication buys
nothing, and this is the protocol the tests check end to end against a local fake Hub.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib
import json
import logging
import os
import re
import shlex
import tempfile
import threading
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from hf_dpo.model_card import HF_TOKEN_PATTERN

logger = logging.getLogger(__name__)

# Top-level files of an output_dir that a push uploads (fnmatch patterns on the file name; nothing in
# sub-folders is ever pushed).
PUSH_PATTERNS: tuple[str, ...] = (
    "adapter_model.safetensors",
    "adapter_config.json",
    # tokenizer files, whichever the tokenizer saves
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "*.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    # model card and results
    "README.md",
    "training_curves.png",
    "train_results.json",
    "eval_results.json",
    "all_results.json",
)
REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json")
DEFAULT_COMMIT_MESSAGE = "Upload DPO adapter with hf_dpo"

_XET_LOCK = threading.Lock()
_SCAN_CHUNK = 1 << 20
_MIN_TOKEN_LENGTH = 8  # a shorter "token" would match by chance in binary files; real ones are ~37 chars


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says what failed and the exact command that retries it."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        reason: str | None = None,
        retry_command: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.reason = reason
        self.retry_command = retry_command


class PushRefusedError(HubPushError, ValueError):
    """The push was refused before anything was sent: invalid repo id, no adapter, a token in a file, a
    file linked from outside output_dir. A HubPushError too, so one `except HubPushError` covers a push."""


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    path_in_repo: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload the adapter files of `output_dir` in one commit; returns its URL.

    `token` defaults to the logged-in token (HF_TOKEN or `hf auth login`). `private` only applies when the
    repo is created. `revision` is a branch, created from main if missing. `path_in_repo` uploads into that
    folder of the repo instead of its root (a checkpoint pushed during training) and deletes the files
    already there that this push does not upload, so the folder mirrors `output_dir`. A base model loaded
    from a local folder is named by the folder's name only in the pushed adapter_config.json. Raises
    PushRefusedError before any request when the push would be wrong, HubPushError when the Hub or the
    network fails.
    """
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    try:
        check_repo_id(repo_id)
        folder_in_repo = _check_path_in_repo(path_in_repo)
        names = files_to_push(output_dir)
        _refuse_secrets(output_dir, names, token, commit_message)
    except PushRefusedError as err:
        err.retry_command = (
            retry_command(output_dir, repo_id, revision=revision, private=private)
            if isinstance(repo_id, str)
            else None
        )
        raise

    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _xet_disabled():
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            # "name" alone becomes "<user>/name" on the Hub: upload to the id the Hub answered with.
            full_repo_id = getattr(repo_url, "repo_id", None) or repo_id
            if revision is not None and revision != "main":
                api.create_branch(full_repo_id, branch=revision, exist_ok=True, repo_type="model")
            with _public_copy(output_dir, names, full_repo_id) as folder:
                commit = api.upload_folder(
                    repo_id=full_repo_id,
                    folder_path=folder,
                    path_in_repo=folder_in_repo,
                    # Exact names, escaped: upload_folder matches with fnmatch, whose "*" also crosses "/".
                    allow_patterns=[glob.escape(name) for name in names],
                    # Relative to path_in_repo: stale files of an earlier checkpoint in that folder go.
                    delete_patterns=["*"] if folder_in_repo else None,
                    repo_type="model",
                    revision=revision,
                    commit_message=commit_message,
                )
    except Exception as err:
        push_error = to_push_error(
            err,
            output_dir=output_dir,
            repo_id=repo_id,
            endpoint=api.endpoint,
            revision=revision,
            private=private,
        )
        if push_error is None:
            raise
        raise push_error from err
    return str(commit.commit_url)


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The names of the top-level files of `output_dir` that a push uploads, sorted.

    Raises PushRefusedError if the folder has no adapter, or if a file to push resolves (through a
    symlink) to a place outside `output_dir`.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise PushRefusedError(f"{output_dir} is not a folder: nothing to push.")
    root = output_dir.resolve()
    names = sorted(
        entry.name
        for entry in os.scandir(output_dir)
        if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in PUSH_PATTERNS)
    )
    for name in names:
        target = (output_dir / name).resolve()
        if not target.is_relative_to(root):
            raise PushRefusedError(
                f"Refusing to push {name}: it points to {target}, outside {output_dir}. Copy the file into the "
                "folder instead of linking it."
            )
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise PushRefusedError(
            f"{output_dir} holds no adapter to push (missing {', '.join(missing)}). Pass the output_dir of a "
            "finished run, or one of its checkpoint-* folders after copying the tokenizer and card into it."
        )
    return names


def check_repo_id(repo_id: str) -> None:
    """Raise PushRefusedError unless `repo_id` is a valid Hub model id: `namespace/name` or `name`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise PushRefusedError(f"Invalid repo id {repo_id!r}: expected 'namespace/name' or 'name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushRefusedError(f"Invalid repo id {repo_id!r}: {err}") from err


def retry_command(
    output_dir: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None
) -> str:
    """The shell command that pushes `output_dir` again (never with the token: it comes from the login)."""
    command = f"hf-dpo push {shlex.quote(str(output_dir))} --repo-id {shlex.quote(repo_id)}"
    if revision is not None and revision != "main":
        command += f" --revision {shlex.quote(revision)}"
    if private:
        command += " --private"
    return command


def to_push_error(
    err: BaseException,
    *,
    output_dir: str | os.PathLike,
    repo_id: str,
    endpoint: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
) -> HubPushError | None:
    """Translate a huggingface_hub / network error into a HubPushError; None for anything else (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError

    retry = retry_command(output_dir, repo_id, revision=revision, private=private)
    footer = f"\nThe run's files are untouched in {output_dir}. Once fixed, retry with:\n    {retry}"
    chain = _exception_chain(err)

    http_error = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if http_error is not None:
        response = http_error.response
        status = response.status_code
        reason = response.reason_phrase or _phrase(status)
        try:
            request = response.request
        except RuntimeError:  # a response built by hand has no request
            request = None
        where = f" from {request.method} {_without_query(str(request.url))}" if request is not None else ""
        message = f"Push to the Hub failed: HTTP {status} {reason}{where}."
        detail = http_error.server_message or (str(err) if isinstance(err, ValueError) else None)
        if detail:
            message += f"\nThe Hub said: {detail.strip()}"
        is_storage = request is not None and not (
            request.url.path.startswith("/api/") or "/info/lfs/" in request.url.path
        )
        if is_storage and 400 <= status < 500:
            message += (
                "\nThe storage server refused a file upload (its pre-signed URL may have expired, or a proxy "
                "altered the upload). Retrying usually works."
            )
        else:
            message += "\n" + _hint(status, repo_id)
        return HubPushError(message + footer, status_code=status, reason=reason, retry_command=retry)

    if any(type(e).__name__ == "OfflineModeIsEnabled" for e in chain):
        message = "Push to the Hub failed: huggingface_hub is in offline mode. Unset HF_HUB_OFFLINE to push."
        return HubPushError(message + footer, reason="offline mode", retry_command=retry)

    transport = next((e for e in chain if isinstance(e, _transport_errors())), None)
    if transport is not None:
        where = endpoint or "the Hub"
        if "timeout" in type(transport).__name__.lower() or isinstance(transport, TimeoutError):
            reason = "timeout"
            message = (
                f"Push to the Hub failed: the connection to {where} timed out ({type(transport).__name__})."
            )
        else:
            reason = "connection error"
            message = (
                f"Push to the Hub failed: could not reach {where} ({type(transport).__name__}: {transport}). "
                "Check the network, any proxy (HTTPS_PROXY) and HF_ENDPOINT."
            )
        return HubPushError(message + footer, reason=reason, retry_command=retry)

    if isinstance(err, ValueError) and "LFS batch API returned errors" in str(err):
        message = f"Push to the Hub failed: the Hub refused a large-file upload.\n{err}"
        return HubPushError(message + footer, reason="LFS error", retry_command=retry)
    return None


# ----------------------------------------------------------------------------------------------- helpers


def _check_path_in_repo(path_in_repo: str | None) -> str | None:
    """A folder of the repo: relative, no `..`; None (or "") is the repo root."""
    if not path_in_repo:
        return None
    parts = path_in_repo.strip("/").split("/")
    if path_in_repo.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise PushRefusedError(
            f"Invalid path_in_repo {path_in_repo!r}: expected a relative folder like 'checkpoint-100'."
        )
    return "/".join(parts)


def public_adapter_config(output_dir: str | os.PathLike) -> bytes | None:
    """adapter_config.json as it should be published, or None when it can go up unchanged.

    peft records the base model as it was loaded; a local folder (`/home/me/models/llama`) would publish
    where it lived, so only its last component is kept, as the model card does. The tiny model's build
    folder becomes its name, "hf_dpo/tiny-llama", which hf_dpo resolves on any machine.
    """
    from hf_dpo.model_card import _is_local_path, _local_name
    from hf_dpo.tiny import TINY_MODEL_NAME

    path = Path(output_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base or not _is_local_path(base):
        return None
    is_tiny = (Path(base).expanduser() / "hf_dpo_tiny.json").is_file()  # the marker ensure_tiny_model writes
    config["base_model_name_or_path"] = TINY_MODEL_NAME if is_tiny else _local_name(base)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


CARD_INPUTS = ("base_model", "datasets", "training", "results", "license", "model_name")


def public_model_card(output_dir: str | os.PathLike, repo_id: str) -> bytes | None:
    """README.md as it should be published to `repo_id`, or None when it can go up unchanged.

    A run trained without `hub_model_id` (or for another repo) has a card whose usage snippet loads
    "path/to/adapter"; pushed later with `hf-dpo push --repo-id`, the card is rendered again from the run's
    hf_dpo_run.json for that repo id. Only hf_dpo's own, unedited card is replaced: if README.md differs from
    what the recorded inputs render (edited by hand, or written by something else), it goes up as it is.
    """
    from hf_dpo.model_card import render_model_card

    output_dir = Path(output_dir)
    try:
        run = json.loads((output_dir / "hf_dpo_run.json").read_text(encoding="utf-8"))
        current = (output_dir / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("hub_model_id") == repo_id or "base_model" not in run:
        return None
    inputs = {key: run[key] for key in CARD_INPUTS if key in run}
    template = run.get("model_card_template")
    try:
        as_written = render_model_card(
            output_dir, **inputs, hub_model_id=run.get("hub_model_id"), template_path=template
        )
        if as_written != current:
            return None
        card = render_model_card(output_dir, **inputs, hub_model_id=repo_id, template_path=template)
    except Exception as err:  # a template that moved or broke: the card as written still describes the run
        logger.warning("model card not re-rendered for %s (%s); pushing README.md as it is", repo_id, err)
        return None
    return card.encode("utf-8")


@contextlib.contextmanager
def _public_copy(output_dir: Path, names: list[str], repo_id: str) -> Iterator[Path]:
    """`output_dir` itself, or a temporary folder of links to its files with a public adapter_config.json
    and a card rendered for `repo_id`."""
    replaced = {}
    if "adapter_config.json" in names and (config := public_adapter_config(output_dir)) is not None:
        replaced["adapter_config.json"] = config
    if "README.md" in names and (card := public_model_card(output_dir, repo_id)) is not None:
        replaced["README.md"] = card
    if not replaced:
        yield output_dir
        return
    with tempfile.TemporaryDirectory(prefix="hf_dpo_push_") as staging:
        staging = Path(staging)
        for name in names:
            if name in replaced:
                (staging / name).write_bytes(replaced[name])
            else:
                (staging / name).symlink_to((output_dir / name).resolve())
        yield staging


def _refuse_secrets(output_dir: Path, names: list[str], token: str | None, commit_message: str) -> None:
    """Refuse the push if the token (given, or the one huggingface_hub would send) is in any pushed file."""
    tokens = {token} if token else set()
    with contextlib.suppress(Exception):  # an OIDC exchange may raise; then there is no local token to leak
        from huggingface_hub import get_token

        if stored := get_token():
            tokens.add(stored)
    needles = [t.encode() for t in tokens if len(t) >= _MIN_TOKEN_LENGTH]
    if any(t.decode() in commit_message for t in needles) or HF_TOKEN_PATTERN.search(commit_message):
        raise PushRefusedError("Refusing to push: the commit message contains a Hugging Face token.")
    for name in names:
        found = _scan_file(output_dir / name, needles)
        if found:
            raise PushRefusedError(
                f"Refusing to push: {name} contains {found}. Nothing was uploaded. Remove it from the file "
                "(and revoke the token at https://huggingface.co/settings/tokens if it was shared), then retry."
            )


def _scan_file(path: Path, needles: list[bytes]) -> str | None:
    """What secret `path` holds ('your Hugging Face token' / 'a Hugging Face token'), or None."""
    token_like = re.compile(HF_TOKEN_PATTERN.pattern.encode())
    overlap = max([len(n) for n in needles] + [64])
    tail = b""
    with open(path, "rb") as file:
        while chunk := file.read(_SCAN_CHUNK):
            window = tail + chunk
            if any(needle in window for needle in needles):
                return "your Hugging Face token"
            if token_like.search(window):
                return "a Hugging Face token (hf_...)"
            tail = window[-overlap:]
    return None


@contextlib.contextmanager
def _xet_disabled() -> Iterator[None]:
    """Upload over plain HTTP + LFS: huggingface_hub reads this constant on every upload, not at import."""
    from huggingface_hub import constants

    with _XET_LOCK:
        previous = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        try:
            yield
        finally:
            constants.HF_HUB_DISABLE_XET = previous


def _hint(status: int, repo_id: str) -> str:
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your account"
    if status == 401:
        return (
            "The Hub did not accept the token (missing, mistyped, expired or revoked). Log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access."
        )
    if status == 403:
        return (
            f"The token may not write to {namespace}: use a token with write permission on that namespace "
            "(fine-grained tokens need it granted explicitly), or push to a namespace you own."
        )
    if status == 404:
        return "The repo or branch was not found: check the repo id and --revision, and that the token can see it."
    if status == 409:
        return (
            "The Hub reported a conflict: the repo changed during the push (another push or an edit in the "
            "browser), or the name is taken by another kind of repo. Wait for the other change, then retry."
        )
    if status == 413:
        return "A file is larger than the Hub accepts in one upload."
    if status == 429:
        return "The Hub is rate-limiting this account: wait a few minutes before retrying."
    if status >= 500:
        return (
            "The Hub had a server-side problem (huggingface_hub already retried the calls it safely can). "
            "Check https://status.huggingface.co and retry in a few minutes."
        )
    return "The Hub rejected the request; the message above says why."


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _without_query(url: str) -> str:
    """Drop the query string: pre-signed upload URLs carry signatures there."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _exception_chain(err: BaseException) -> list[BaseException]:
    """err, its cause, the cause's cause... (an LFS upload error arrives wrapped in a RuntimeError)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _transport_errors() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2 uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError, AttributeError):
            classes.append(importlib.import_module(module).TransportError)
    return tuple(classes)


def push_folder(output_dir, repo_id, **kwargs) -> str:  # TEMPORARY until the hub rewrite lands
    if kwargs.get("commit_message") is None:
        kwargs.pop("commit_message", None)
    return push_output_dir(output_dir, repo_id, **kwargs)


push_run = push_folder
