"""Tests of hf_dpo.hub: pushes with the real huggingface_hub client over HTTP to a local fake Hub.

The `fake_hub` fixture (tests/hub_server.py) runs the fake Hub on 127.0.0.1 and points huggingface_hub at
it for the test's duration; hf_dpo itself is given nothing but the token. Nothing here touches
huggingface.co.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

from hf_dpo.card import RUN_INFO_FILE, write_card
from hf_dpo.curves import plot_training_curves
from hf_dpo.hub import (
    PUSH_PATTERNS,
    HubPushError,
    PushRefusedError,
    check_repo_id,
    push_folder,
    push_run,
    retry_command,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
REPO = "someone/tiny-dpo-adapter"
PUSHED = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "README.md",
    "training_curves.png",
    "train_results.json",
    "eval_results.json",
    "all_results.json",
}
NOT_PUSHED = {
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
    "trainer_state.json",
    RUN_INFO_FILE,
    "notes.txt",
    "checkpoint-1/adapter_model.safetensors",
    "checkpoint-1/adapter_config.json",
    "checkpoint-1/tokenizer.model",
    "checkpoint-1/optimizer.pt",
}
CARD_INPUTS = {
    "base_model": "Qwen/Qwen2.5-0.5B",
    "datasets": ["trl-lib/ultrafeedback_binarized"],
    "training": {"loss_type": "sigmoid", "beta": 0.1},
    "results": {"train_loss": 0.67, "eval_loss": 0.66, "eval_rewards/accuracies": 0.5},
}


@pytest.fixture
def output_dir(tmp_path):
    """A run folder as the trainer leaves it, with files that must be pushed and files that must not."""
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    lora = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": torch.randn(
            8, 64, generator=generator
        )
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    save_file(lora, out / "adapter_model.safetensors", metadata={"format": "pt"})
    save_file(lora, out / "checkpoint-1" / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}
    for folder in (out, out / "checkpoint-1"):
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "tokenizer.model").write_bytes(b"\x0a\x07sp-model" + bytes(range(256)))
    (out / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}})
    )
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    history = [
        {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0, "step": 1},
        {"loss": 0.65, "rewards/accuracies": 0.75, "rewards/margins": 0.05, "step": 2},
        {"eval_loss": 0.66, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.02, "step": 2},
    ]
    plot_training_curves(history, out)
    (out / "train_results.json").write_text(json.dumps({"train_loss": 0.67}))
    (out / "eval_results.json").write_text(json.dumps({"eval_loss": 0.66}))
    (out / "all_results.json").write_text(json.dumps(CARD_INPUTS["results"]))
    write_card(out, {**CARD_INPUTS, "hub_model_id": REPO})
    (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (out / "notes.txt").write_text("scratch notes")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (out / name).write_bytes(b"\x80\x04not for the hub" + name.encode())
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"\x80\x04optimizer")
    return out


def local_files(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def closed_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ what goes up


def test_push_uploads_exactly_the_allowed_files(fake_hub, output_dir):
    assert all(
        not p.startswith(("checkpoint-", "optimizer", "scheduler", "rng_state")) for p in PUSH_PATTERNS
    )
    url = push_folder(output_dir, REPO, token=fake_hub.token)

    assert url.startswith(f"{fake_hub.endpoint}/{REPO}/commit/")
    assert fake_hub.files(REPO) == local_files(output_dir, PUSHED)  # these files, byte for byte, nothing else
    assert not NOT_PUSHED & set(fake_hub.files(REPO))
    assert {"adapter_model.safetensors", "training_curves.png", "tokenizer.model"} <= fake_hub.lfs_files(REPO)
    assert fake_hub.repos[REPO].commits[-1]["summary"] == "Upload DPO adapter with hf_dpo"
    assert fake_hub.unhandled == []  # the fake Hub understood every request the client made

    # The token went in the Authorization header of every API call, and nowhere else.
    token = fake_hub.token
    api_calls = [r for r in fake_hub.requests if r.endpoint not in ("lfs_upload", "lfs_complete")]
    assert api_calls and all(r.headers["authorization"] == f"Bearer {token}" for r in api_calls)
    uploads = fake_hub.requests_to("lfs_upload")
    assert len(uploads) == 3 and all("authorization" not in r.headers for r in uploads)
    assert all(token.encode() not in r.body for r in fake_hub.requests)
    assert all(token.encode() not in data for data in fake_hub.files(REPO).values())


def test_push_with_multipart_lfs_then_again_without_changes(fake_hub, output_dir):
    fake_hub.multipart_chunk_size = 8192  # LFS files over 8 KiB go up in 8 KiB parts, then a completion call
    first = push_folder(output_dir, REPO, token=fake_hub.token)
    assert fake_hub.files(REPO) == local_files(output_dir, PUSHED)
    weights = (output_dir / "adapter_model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    parts = [r for r in fake_hub.requests_to("lfs_upload") if r.path.startswith(f"/__lfs__/{oid}/")]
    assert len(parts) == math.ceil(len(weights) / 8192) > 1
    assert oid in {r.path.rsplit("/", 1)[1] for r in fake_hub.requests_to("lfs_complete")}

    second = push_folder(output_dir, REPO, token=fake_hub.token)
    assert second == first
    assert len(fake_hub.repos[REPO].commits) == 1  # nothing changed: no second commit


def test_push_name_only_private_and_branch(fake_hub, output_dir):
    push_folder(output_dir, "tiny-dpo", token=fake_hub.token, private=True, revision="dev")
    repo = fake_hub.repos["test-user/tiny-dpo"]  # the Hub puts a bare name in the token owner's namespace
    assert repo.private
    assert set(fake_hub.files("test-user/tiny-dpo", "dev")) == PUSHED
    assert fake_hub.files("test-user/tiny-dpo", "main") == {}
    api = HfApi(token=fake_hub.token)
    assert set(api.list_repo_files("test-user/tiny-dpo", revision="dev")) == PUSHED
    push_folder(output_dir, "tiny-dpo", token=fake_hub.token, revision="dev")  # the branch exists now
    assert len(repo.commits) == 1


def test_push_from_a_fresh_process_with_hf_token(fake_hub, output_dir, tmp_path):
    """A subprocess finds the fake Hub through the variables the fixture set, and the token in HF_TOKEN."""
    import os

    env = {**os.environ, "HF_TOKEN": fake_hub.token, "HF_HOME": str(tmp_path / "hf_home")}
    code = f"from hf_dpo.hub import push_folder; print(push_folder({str(output_dir)!r}, {REPO!r}))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{fake_hub.endpoint}/{REPO}/commit/")
    assert fake_hub.files(REPO) == local_files(output_dir, PUSHED)
    assert fake_hub.requests_to("commit")[0].headers["authorization"] == f"Bearer {fake_hub.token}"


def test_path_in_repo_mirrors_the_folder_and_deletes_stale_files(fake_hub, output_dir):
    push_folder(output_dir, REPO, token=fake_hub.token)
    push_folder(output_dir, REPO, token=fake_hub.token, path_in_repo="last-checkpoint")
    (output_dir / "chat_template.jinja").unlink()
    (output_dir / "eval_results.json").unlink()
    push_folder(output_dir, REPO, token=fake_hub.token, path_in_repo="last-checkpoint/")
    files = fake_hub.files(REPO)
    folder = {p.split("/", 1)[1] for p in files if p.startswith("last-checkpoint/")}
    assert folder == PUSHED - {"chat_template.jinja", "eval_results.json"}  # stale files deleted
    assert {p for p in files if "/" not in p} == PUSHED  # the repo root is left alone
    for bad in ("../x", "/abs", "a/../b", "a//b", "."):
        with pytest.raises(PushRefusedError, match="Invalid path_in_repo"):
            push_folder(output_dir, REPO, token=fake_hub.token, path_in_repo=bad)


def test_a_local_base_model_is_published_by_its_folder_name(fake_hub, output_dir, tmp_path):
    local_base, tiny_base = tmp_path / "models" / "my-base", tmp_path / "cache" / "model"
    for folder in (local_base, tiny_base):
        folder.mkdir(parents=True)
    (tiny_base / "hf_dpo_tiny.json").write_text("{}")  # the marker hf_dpo.tiny leaves in its build folder
    config = json.loads((output_dir / "adapter_config.json").read_text())
    for base, published in ((local_base, "my-base"), (tiny_base, "hf_dpo/tiny-llama")):
        local = {**config, "base_model_name_or_path": str(base)}
        (output_dir / "adapter_config.json").write_text(json.dumps(local))
        push_folder(output_dir, REPO, token=fake_hub.token)
        assert json.loads(fake_hub.files(REPO)["adapter_config.json"]) == {
            **local,
            "base_model_name_or_path": published,
        }
        assert str(tmp_path).encode() not in fake_hub.files(REPO)["adapter_config.json"]
        assert (
            json.loads((output_dir / "adapter_config.json").read_text()) == local
        )  # the local file untouched


def test_push_run_renders_the_card_for_another_repo_unless_edited(fake_hub, output_dir):
    write_card(output_dir, {**CARD_INPUTS, "hub_model_id": None})  # trained without hub_model_id
    local_card = (output_dir / "README.md").read_bytes()
    assert b'"path/to/adapter"' in local_card

    push_run(output_dir, "me/renamed", token=fake_hub.token)
    card = fake_hub.files("me/renamed")["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "me/renamed")' in card and "path/to/adapter" not in card
    assert "\n# renamed\n" in card
    assert (output_dir / "README.md").read_bytes() == local_card  # local files are not rewritten
    push_folder(output_dir, "me/as-is", token=fake_hub.token)  # push_folder sends README.md as it is
    assert fake_hub.files("me/as-is")["README.md"] == local_card

    edited = local_card + b"\nMy own notes.\n"
    (output_dir / "README.md").write_bytes(edited)
    push_run(output_dir, "me/edited", token=fake_hub.token)
    assert fake_hub.files("me/edited")["README.md"] == edited
    assert (output_dir / "README.md").read_bytes() == edited


def test_push_changes_no_global_state(fake_hub, output_dir):
    def snapshot():
        return {k: v for k, v in vars(constants).items() if k.isupper()}

    before = snapshot()
    import os

    environ = dict(os.environ)
    push_run(output_dir, REPO, token=fake_hub.token)
    assert snapshot() == before and dict(os.environ) == environ


def test_no_hf_dpo_module_sets_huggingface_hub_constants_or_the_environment():
    """Process-global switches belong to the user: hf_dpo reads them and never assigns them."""
    assignment = re.compile(
        r"\bconstants\.[A-Z_]+\s*=(?!=)|setattr\(\s*constants|os\.environ\[[^]]+\]\s*=(?!=)"
        r"|os\.environ\.(update|setdefault|pop|clear)\(|os\.putenv\(|os\.unsetenv\("
    )
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "hf_dpo").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if assignment.search(line)
    ]
    assert found == []
    assert assignment.search("constants.HF_HUB_DISABLE_XET = True")  # the pattern does catch one
    assert assignment.search('os.environ["HF_HUB_OFFLINE"] = "0"')


def test_the_fake_hub_fixture_sets_what_the_client_needs_and_nothing_more(fake_hub):
    """For this process (huggingface_hub's constants) and for subprocesses (the environment): the endpoint,
    xet off, offline mode off. The token stays the test's to give."""
    import os

    assert fake_hub.endpoint == constants.ENDPOINT
    assert constants.HF_HUB_DISABLE_XET is True and constants.HF_HUB_OFFLINE is False
    assert {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE")} == {
        "HF_ENDPOINT": fake_hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }
    assert "HF_TOKEN" not in os.environ


# --------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "endpoint, status, hint",
    [
        ("*", 401, "hf auth login"),
        ("create_repo", 403, "may not write to someone"),
        ("create_repo", 404, "check the repo id and --revision"),
        ("commit", 409, "changed during the push"),
        ("create_repo", 413, "larger than the Hub accepts"),
        ("create_repo", 429, "rate-limiting"),
        ("commit", 500, "status.huggingface.co"),
        ("create_repo", 503, "status.huggingface.co"),
        ("lfs_upload", 403, "from PUT http://127.0.0.1"),
    ],
)
def test_hub_errors_become_hub_push_error_with_retry_command(fake_hub, output_dir, endpoint, status, hint):
    fake_hub.fail(endpoint, status)
    with pytest.raises(HubPushError) as info:
        push_folder(output_dir, REPO, token=fake_hub.token, revision="dev", private=True)
    message = str(info.value)
    assert info.value.status_code == status
    assert message.startswith(f"Push to the Hub failed: HTTP {status} from ")
    assert hint in message
    assert "The Hub said: Injected failure" in message or status == 401
    command = f"hf-dpo push {output_dir} --repo-id {REPO} --revision dev --private"
    assert message.endswith(
        f"The run's files are untouched in {output_dir}. Once fixed, retry with:\n    {command}"
    )
    assert info.value.retry_command == command
    assert fake_hub.token not in message and "sig=" not in message
    assert not fake_hub.repos.get(REPO) or not fake_hub.repos[REPO].commits


def test_wrong_or_missing_token_is_401_with_login_hint(fake_hub, output_dir):
    for token in ("hf_" + "w" * 34, None):  # None: no HF_TOKEN, no stored login (conftest.py)
        with pytest.raises(HubPushError, match="HTTP 401") as info:
            push_folder(output_dir, REPO, token=token)
        assert "hf auth login" in str(info.value)


def test_transient_server_error_is_retried_by_huggingface_hub(fake_hub, output_dir):
    fake_hub.fail("preupload", 502, times=1)  # huggingface_hub backs off 1 s and retries this call
    push_folder(output_dir, REPO, token=fake_hub.token)
    assert [r.status for r in fake_hub.requests_to("preupload")] == [502, 200]
    assert set(fake_hub.files(REPO)) == PUSHED


def test_unreachable_hub_is_a_connection_error(output_dir, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubPushError, match=f"could not reach {endpoint}") as info:
        push_folder(output_dir, REPO, token="hf_" + "z" * 34)
    assert info.value.status_code is None
    assert info.value.retry_command == f"hf-dpo push {output_dir} --repo-id {REPO}"
    assert str(info.value).endswith(info.value.retry_command)


def test_a_hub_that_does_not_answer_is_a_timeout(output_dir, monkeypatch):
    """A server that accepts the connection and never answers, and a client with a 0.5 s timeout."""
    import httpx2
    import huggingface_hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        accepted = []
        threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(timeout=0.5))
        try:
            with pytest.raises(HubPushError, match="timed out") as info:
                push_folder(output_dir, REPO, token="hf_" + "z" * 34)
        finally:
            huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    assert "ReadTimeout" in str(info.value) and "hf-dpo push" in str(info.value)


def test_offline_mode_is_named(fake_hub, output_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="offline mode; unset HF_HUB_OFFLINE"):
        push_folder(output_dir, REPO, token=fake_hub.token)
    assert fake_hub.requests == []


def test_an_error_that_is_neither_http_nor_network_keeps_its_type(fake_hub, output_dir):
    fake_hub.fail("commit", 200)  # "success" without a commit URL: the client's parsing fails (KeyError)
    with pytest.raises(KeyError, match="commitUrl"):  # a bug, with its traceback, not a "Hub outage"
        push_folder(output_dir, REPO, token=fake_hub.token)


# --------------------------------------------------------------------------- refused before any request


@pytest.mark.parametrize(
    "planted",
    [
        ("README.md", "\n\nPushed with token {token}\n"),
        ("adapter_config.json", json.dumps({"hub_token": "{token}"})),
        ("all_results.json", json.dumps({"note": "hf_" + "Q" * 34})),  # any token-shaped string
    ],
)
def test_token_in_a_file_refuses_the_push_before_any_request(fake_hub, output_dir, planted):
    name, text = planted
    with open(output_dir / name, "a") as file:
        file.write(text.replace("{token}", fake_hub.token))
    with pytest.raises(PushRefusedError, match=name) as info:
        push_run(output_dir, REPO, token=fake_hub.token)
    assert fake_hub.requests == []
    assert isinstance(info.value, HubPushError) and isinstance(info.value, ValueError)
    assert fake_hub.token not in str(info.value)
    assert info.value.retry_command == f"hf-dpo push {output_dir} --repo-id {REPO}"


def test_the_logged_in_token_is_found_too(fake_hub, output_dir, monkeypatch):
    short = "s3cr3t-but-not-hf-shaped"  # only an exact match can find it
    (output_dir / "tokenizer_config.json").write_text(json.dumps({"note": short}))
    monkeypatch.setenv("HF_TOKEN", short)
    with pytest.raises(PushRefusedError, match="tokenizer_config.json contains a Hugging Face token"):
        push_folder(output_dir, REPO)
    with pytest.raises(PushRefusedError, match="commit message"):
        push_folder(output_dir, REPO, token=fake_hub.token, commit_message="hf_" + "c" * 34)
    assert fake_hub.requests == []


def test_token_inside_the_safetensors_file_refuses_the_push(fake_hub, output_dir):
    save_file({"w": torch.zeros(2)}, output_dir / "adapter_model.safetensors", metadata={"t": fake_hub.token})
    with pytest.raises(PushRefusedError, match="adapter_model.safetensors"):
        push_folder(output_dir, REPO, token=fake_hub.token)
    assert fake_hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad..name", "-leading-dash", "has space/x", "", "org/", None])
def test_invalid_repo_id_is_refused(fake_hub, output_dir, repo_id):
    with pytest.raises(PushRefusedError, match="Invalid repo id"):
        push_folder(output_dir, repo_id, token=fake_hub.token)
    with pytest.raises(PushRefusedError, match="Invalid repo id"):
        check_repo_id(repo_id)
    assert fake_hub.requests == []


def test_file_linked_from_outside_output_dir_is_refused(fake_hub, output_dir, tmp_path):
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    (output_dir / "eval_results.json").unlink()
    (output_dir / "eval_results.json").symlink_to(secret)
    with pytest.raises(PushRefusedError, match="outside"):
        push_folder(output_dir, REPO, token=fake_hub.token)
    assert fake_hub.requests == []


def test_folder_without_adapter_is_refused(fake_hub, tmp_path):
    (tmp_path / "README.md").write_text("# not a run")
    with pytest.raises(PushRefusedError, match="adapter_model.safetensors"):
        push_folder(tmp_path, REPO, token=fake_hub.token)
    with pytest.raises(PushRefusedError, match="not a folder"):
        push_folder(tmp_path / "missing", REPO, token=fake_hub.token)
    assert fake_hub.requests == []


def test_retry_command_quotes_what_the_shell_would_split():
    assert retry_command("/tmp/my run", "me/x") == "hf-dpo push '/tmp/my run' --repo-id me/x"
    assert retry_command("out", "me/x", revision="main", private=False) == "hf-dpo push out --repo-id me/x"
