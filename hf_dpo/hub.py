"""Publish a run's output_dir (adapter, tokenizer, card, results only) to the Hub with `HfApi.upload_folder`,
under huggingface_hub's own settings (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE...), which hf_dpo never changes."""

import json
import mmap
import os
import re
import shlex
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_dpo.card import HF_TOKEN_PATTERN, card_for_repo, is_local_path, local_name
from hf_dpo.tiny import TINY_MODEL_NAME

# The top-level files of an output_dir that a push uploads (fnmatch patterns): never optimizer, scheduler or
# RNG states, training_args.bin, hf_dpo_run.json nor checkpoint-* folders.
REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FILES += ("chat_template.jinja", "*.model", "vocab.json", "merges.txt", "vocab.txt")
CARD_AND_RESULTS = ("README.md", "training_curves.png", "train_results.json", "eval_results.json")
PUSH_PATTERNS = REQUIRED_FILES + TOKENIZER_FILES + CARD_AND_RESULTS + ("all_results.json",)
# What the Hub's answer means, by HTTP status (5xx as 500).
_HINTS = {
    401: "The Hub did not accept the token: log in with `hf auth login`, or set HF_TOKEN to a write token.",
    403: "The token may not write to {namespace}: use one with write permission there (fine-grained tokens "
    "need it granted explicitly), or push to a namespace you own.",
    404: "The repo or branch was not found: check the repo id and --revision, and that the token can see it.",
    409: "The repo changed during the push (another push, an edit in the browser): wait, then retry.",
    413: "A file is larger than the Hub accepts in one upload.",
    429: "The Hub is rate-limiting this account: wait a few minutes before retrying.",
    500: "The Hub had a server-side problem (huggingface_hub already retried what it safely can): check "
    "https://status.huggingface.co and retry in a few minutes.",
}


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says what failed and ends with the command that retries it."""

    def __init__(self, message: str, *, retry_command: str | None = None, status_code: int | None = None):
        super().__init__(message)
        self.retry_command, self.status_code = retry_command, status_code


class PushRefusedError(HubPushError, ValueError):
    """Refused before any request (bad repo id, no adapter, a token in a file...); a HubPushError too."""


def push_folder(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload DPO adapter with hf_dpo",
    path_in_repo: str | None = None,
    render_card: bool = False,
) -> str:
    """Create `repo_id` if needed and upload the PUSH_PATTERNS files of `output_dir` in one commit; its URL.
    `token` defaults to huggingface_hub's; `private` applies to a new repo; `revision` is a branch, created if
    missing; `path_in_repo`, a folder made to mirror `output_dir`; `render_card`: see `push_run`."""
    check_repo_id(repo_id)
    folder_in_repo = (path_in_repo or "").rstrip("/") or None  # None: the repo root
    if folder_in_repo and {"", ".", ".."} & set(folder_in_repo.split("/")):  # also a leading "/"
        raise PushRefusedError(
            f"Invalid path_in_repo {path_in_repo!r}: expected a folder like 'checkpoint-1'."
        )
    output_dir = Path(output_dir)
    retry = retry_command(output_dir, repo_id, revision=revision, private=private)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_dpo_push_") as staging:
        try:
            _stage(output_dir, Path(staging), repo_id if render_card else None)
            _refuse_secrets(Path(staging), token, commit_message)
            # A bare name lands in the token owner's namespace: upload to the id the Hub answered with.
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                path_in_repo=folder_in_repo,
                delete_patterns=["*"] if folder_in_repo else None,  # relative to path_in_repo: stale files go
                revision=revision,
                commit_message=commit_message,
            )
        except PushRefusedError as err:  # nothing was sent
            err.retry_command = retry
            raise
        except Exception as err:
            _raise_push_error(err, output_dir, repo_id, api.endpoint, retry)
            raise  # not the Hub's nor the network's doing: a bug, with its own traceback
    return str(commit.commit_url)


def push_run(output_dir: str | os.PathLike, repo_id: str, **kwargs) -> str:
    """`push_folder` with hf_dpo's card, unless edited since, rendered for `repo_id` (local files unchanged)."""
    return push_folder(output_dir, repo_id, render_card=True, **kwargs)


def check_repo_id(repo_id: str) -> None:
    """Raise PushRefusedError unless `repo_id` is a valid Hub model id: `namespace/name` or `name`."""
    if not isinstance(repo_id, str):
        raise PushRefusedError(f"Invalid repo id {repo_id!r}: expected 'namespace/name' or 'name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushRefusedError(f"Invalid repo id {repo_id!r}: {err}") from err


def retry_command(
    output_dir: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None
) -> str:
    """The shell command that pushes `output_dir` again (never with the token: it comes from the login)."""
    command = ["hf-dpo", "push", str(output_dir), "--repo-id", repo_id]
    command += ["--revision", revision] if revision not in (None, "main") else []
    return shlex.join(command + (["--private"] if private else []))


def public_adapter_config(output_dir: str | os.PathLike) -> bytes | None:
    """adapter_config.json naming a local base model by its folder (or "hf_dpo/tiny-llama"); None if unchanged."""
    try:
        config = json.loads((Path(output_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not is_local_path(base):
        return None
    is_tiny = (Path(base).expanduser() / "hf_dpo_tiny.json").is_file()  # the marker ensure_tiny_model writes
    config["base_model_name_or_path"] = TINY_MODEL_NAME if is_tiny else local_name(base)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _stage(output_dir: Path, staging: Path, card_repo_id: str | None) -> None:
    """Link the files to push into `staging`, writing there the public adapter_config.json and the card."""
    if not output_dir.is_dir():
        raise PushRefusedError(f"{output_dir} is not a folder: nothing to push.")
    names = sorted({p.name for pattern in PUSH_PATTERNS for p in output_dir.glob(pattern) if p.is_file()})
    if missing := [name for name in REQUIRED_FILES if name not in names]:
        raise PushRefusedError(
            f"{output_dir} holds no adapter to push (missing {', '.join(missing)}). Pass the output_dir of a "
            "finished run, or one of its checkpoint-* folders after copying the tokenizer and card into it."
        )
    replaced = {"adapter_config.json": public_adapter_config(output_dir)}
    if card_repo_id and (card := card_for_repo(output_dir, card_repo_id)):
        replaced["README.md"] = card.encode()
    for name in names:
        target = (output_dir / name).resolve()
        if not target.is_relative_to(output_dir.resolve()):
            raise PushRefusedError(
                f"Refusing to push {name}: it points to {target}, outside {output_dir}. Copy the file into the "
                "folder instead of linking it."
            )
        if replaced.get(name) is not None:
            (staging / name).write_bytes(replaced[name])
        else:
            (staging / name).symlink_to(target)


def _refuse_secrets(folder: Path, token: str | None, commit_message: str) -> None:
    """Refuse the push if the token (given or the login's) or any hf_... token is in a file or the message."""
    try:
        tokens = {token, get_token()}
    except Exception:  # an OIDC token exchange that fails: then only the given token can leak
        tokens = {token}
    needles = [re.escape(t.encode()) for t in tokens if t and len(t) >= 8]  # shorter would match by chance
    secret = re.compile(b"|".join([*needles, HF_TOKEN_PATTERN.pattern.encode()]))  # a token or token-shaped
    if secret.search(commit_message.encode()):
        raise PushRefusedError("Refusing to push: the commit message contains a Hugging Face token.")
    for path in sorted(p for p in folder.iterdir() if p.stat().st_size > 0):  # mmap refuses empty files
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if secret.search(data):
                raise PushRefusedError(
                    f"Refusing to push: {path.name} contains a Hugging Face token. Nothing was uploaded. Remove "
                    "it (and revoke the token at https://huggingface.co/settings/tokens if it was shared), then "
                    "retry."
                )


def _raise_push_error(err: BaseException, output_dir: Path, repo_id: str, endpoint: str, retry: str) -> None:
    """Raise a HubPushError for a Hub or network failure anywhere in `err`'s chain; return for anything else."""
    try:
        import httpx2 as httpx  # huggingface_hub 2
    except ImportError:  # huggingface_hub 1
        import httpx

    chain, cause = [], err  # err, its causes... (an LFS upload error arrives wrapped in a RuntimeError)
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    network = next((e for e in chain if isinstance(e, (httpx.TransportError, ConnectionError))), None)
    status = http.response.status_code if http is not None else None
    if http is not None:
        url = http.response.request.url.copy_with(query=None)  # no query: upload signatures live there
        said = f"\nThe Hub said: {http.server_message.strip()}" if http.server_message else ""
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your account"
        hint = _HINTS.get(min(status, 500), "The Hub refused the request.").format(namespace=namespace)
        message = f"HTTP {status} from {http.response.request.method} {url}.{said}\n{hint}"
    elif any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        message = "huggingface_hub is in offline mode; unset HF_HUB_OFFLINE to push."
    elif isinstance(network, httpx.TimeoutException):
        message = f"the connection to {endpoint} timed out ({type(network).__name__})."
    elif network is not None:
        message = f"could not reach {endpoint} ({type(network).__name__}: {network}). Check the network, any "
        message += "proxy (HTTPS_PROXY) and HF_ENDPOINT."
    else:
        return
    message += f"\nThe run's files are untouched in {output_dir}. Once fixed, retry with:\n    {retry}"
    raise HubPushError(f"Push to the Hub failed: {message}", retry_command=retry, status_code=status) from err
