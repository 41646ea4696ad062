"""Tests of hf_dpo.hub: pushes with the real huggingface_hub client over HTTP to a local fake Hub.

The fake Hub (tests/hub_server.py) runs on 127.0.0.1 with a random port; push_output_dir is pointed at it
with `endpoint=hub.endpoint`. Nothing here touches huggingface.co.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

from hf_dpo.hub import (
    PUSH_PATTERNS,
    HubPushError,
    PushRefusedError,
    files_to_push,
    push_output_dir,
    to_push_error,
)
from hf_dpo.model_card import plot_training_curves, write_model_card

try:
    from hub_server import FakeHub
except ImportError:  # tests/ imported as a package
    from tests.hub_server import FakeHub

pytestmark = pytest.mark.timeout(60)

TOKEN = "hf_TestTokenDoNotLeak" + "x" * 16
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
    "notes.txt",
    "checkpoint-1/adapter_model.safetensors",
    "checkpoint-1/adapter_config.json",
    "checkpoint-1/tokenizer.model",
    "checkpoint-1/optimizer.pt",
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub that accepts TOKEN, in a process with no Hugging Face login of its own."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    # Left on, as in a default install: push_output_dir must switch xet off by itself.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with FakeHub(tokens=[TOKEN]) as server:
        yield server


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
    results = {"train_loss": 0.67, "eval_loss": 0.66, "eval_rewards/accuracies": 0.5}
    (out / "train_results.json").write_text(json.dumps({"train_loss": 0.67}))
    (out / "eval_results.json").write_text(json.dumps({"eval_loss": 0.66}))
    (out / "all_results.json").write_text(json.dumps(results))
    write_model_card(
        out,
        base_model="Qwen/Qwen2.5-0.5B",
        datasets=["trl-lib/ultrafeedback_binarized"],
        training={"loss_type": "sigmoid", "beta": 0.1},
        results=results,
        hub_model_id=REPO,
    )
    (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (out / "notes.txt").write_text("scratch notes")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (out / name).write_bytes(b"\x80\x04not for the hub" + name.encode())
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"\x80\x04optimizer")
    return out


def local_files(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def test_files_to_push_are_the_adapter_tokenizer_card_and_results(output_dir):
    assert set(files_to_push(output_dir)) == PUSHED
    assert all(
        not name.startswith(("checkpoint-", "optimizer", "scheduler", "rng_state")) for name in PUSH_PATTERNS
    )


def test_push_uploads_exactly_the_allowed_files(hub, output_dir):
    url = push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)

    assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert hub.files(REPO) == local_files(output_dir, PUSHED)  # these files, byte for byte, and nothing else
    assert {"adapter_model.safetensors", "training_curves.png", "tokenizer.model"} <= hub.lfs_files(REPO)
    assert hub.repos[REPO].commits[-1]["summary"] == "Upload DPO adapter with hf_dpo"
    assert hub.unhandled == []  # the fake Hub understood every request the client made
    assert constants.HF_HUB_DISABLE_XET is False  # restored after the push

    # The token went in the Authorization header of every API call, and nowhere else.
    api_calls = [r for r in hub.requests if r.endpoint not in ("lfs_upload", "lfs_complete")]
    assert api_calls and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api_calls)
    uploads = hub.requests_to("lfs_upload")
    assert len(uploads) == 3 and all("authorization" not in r.headers for r in uploads)
    assert all(TOKEN.encode() not in r.body for r in hub.requests)
    assert all(TOKEN.encode() not in data for data in hub.files(REPO).values())


def test_push_with_multipart_lfs_then_again_without_changes(hub, output_dir):
    hub.multipart_chunk_size = 8192  # LFS files over 8 KiB go up in 8 KiB parts, then a completion call
    first = push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.files(REPO) == local_files(output_dir, PUSHED)
    weights = (output_dir / "adapter_model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    parts = [r for r in hub.requests_to("lfs_upload") if r.path.startswith(f"/__lfs__/{oid}/")]
    assert len(parts) == math.ceil(len(weights) / 8192) > 1
    assert oid in {r.path.rsplit("/", 1)[1] for r in hub.requests_to("lfs_complete")}

    second = push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert second == first
    assert len(hub.repos[REPO].commits) == 1  # nothing changed: no second commit


def test_push_name_only_private_and_branch(hub, output_dir):
    push_output_dir(output_dir, "tiny-dpo", token=TOKEN, endpoint=hub.endpoint, private=True, revision="dev")
    repo = hub.repos["test-user/tiny-dpo"]  # the Hub puts a bare name in the token owner's namespace
    assert repo.private
    assert set(hub.files("test-user/tiny-dpo", "dev")) == PUSHED
    assert hub.files("test-user/tiny-dpo", "main") == {}
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert set(api.list_repo_files("test-user/tiny-dpo", revision="dev")) == PUSHED


def test_push_from_a_fresh_process_with_hf_endpoint_and_hf_token(hub, output_dir, tmp_path):
    """How a CLI test reaches the fake Hub: HF_ENDPOINT and HF_TOKEN, read when huggingface_hub is imported."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home")}
    code = f"from hf_dpo.hub import push_output_dir; print(push_output_dir({str(output_dir)!r}, {REPO!r}))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert hub.files(REPO) == local_files(output_dir, PUSHED)
    assert hub.requests_to("commit")[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    "endpoint, status",
    [
        ("*", 401),
        ("create_repo", 403),
        ("commit", 409),
        ("commit", 500),
        ("create_repo", 503),
        ("lfs_upload", 403),
    ],
)
def test_hub_errors_become_hub_push_error_with_retry_command(hub, output_dir, endpoint, status):
    hub.fail(endpoint, status)
    with pytest.raises(HubPushError) as info:
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    message = str(info.value)
    assert info.value.status_code == status
    assert f"HTTP {status}" in message
    assert f"hf-dpo push {output_dir} --repo-id {REPO}" in message
    assert info.value.retry_command == f"hf-dpo push {output_dir} --repo-id {REPO}"
    assert TOKEN not in message and "sig=" not in message
    assert not hub.repos.get(REPO) or not hub.repos[REPO].commits


def test_wrong_or_missing_token_is_401_with_login_hint(hub, output_dir):
    for token in ("hf_" + "w" * 34, None):  # None: no HF_TOKEN, no stored login (see the fixture)
        with pytest.raises(HubPushError, match="401") as info:
            push_output_dir(output_dir, REPO, token=token, endpoint=hub.endpoint)
        assert "hf auth login" in str(info.value)


def test_transient_server_error_is_retried_by_huggingface_hub(hub, output_dir):
    hub.fail("preupload", 502, times=1)  # huggingface_hub backs off 1 s and retries this call
    push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert [r.status for r in hub.requests_to("preupload")] == [502, 200]
    assert set(hub.files(REPO)) == PUSHED


def test_unreachable_hub_is_a_connection_error(output_dir):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HubPushError, match="could not reach") as info:
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert info.value.reason == "connection error"
    assert "hf-dpo push" in str(info.value)


def test_offline_mode_is_named(hub, output_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_timeouts_and_other_errors_are_translated_or_left_alone(tmp_path):
    import httpx2

    error = to_push_error(httpx2.ReadTimeout("timed out"), output_dir=tmp_path, repo_id=REPO)
    assert error.reason == "timeout" and "hf-dpo push" in str(error)
    assert to_push_error(TypeError("a bug"), output_dir=tmp_path, repo_id=REPO) is None


@pytest.mark.parametrize(
    "planted",
    [
        ("README.md", f"\n\nPushed with token {TOKEN}\n"),
        ("adapter_config.json", json.dumps({"hub_token": TOKEN})),
        ("all_results.json", json.dumps({"note": "hf_" + "Q" * 34})),  # any token-shaped string
    ],
)
def test_token_in_a_file_refuses_the_push_before_any_request(hub, output_dir, planted):
    name, text = planted
    with open(output_dir / name, "a") as file:
        file.write(text)
    with pytest.raises(PushRefusedError, match=name) as info:
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []
    assert isinstance(info.value, HubPushError) and isinstance(info.value, ValueError)
    assert TOKEN not in str(info.value)


def test_token_inside_the_safetensors_file_refuses_the_push(hub, output_dir):
    save_file({"w": torch.zeros(2)}, output_dir / "adapter_model.safetensors", metadata={"t": TOKEN})
    with pytest.raises(PushRefusedError, match="adapter_model.safetensors"):
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad..name", "-leading-dash", "has space/x", "", "org/"])
def test_invalid_repo_id_is_refused(hub, output_dir, repo_id):
    with pytest.raises(PushRefusedError, match="Invalid repo id"):
        push_output_dir(output_dir, repo_id, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_file_linked_from_outside_output_dir_is_refused(hub, output_dir, tmp_path):
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    (output_dir / "eval_results.json").unlink()
    (output_dir / "eval_results.json").symlink_to(secret)
    with pytest.raises(PushRefusedError, match="outside"):
        push_output_dir(output_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_folder_without_adapter_is_refused(hub, tmp_path):
    (tmp_path / "README.md").write_text("# not a run")
    with pytest.raises(PushRefusedError, match="adapter_model.safetensors"):
        push_output_dir(tmp_path, REPO, token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(PushRefusedError, match="not a folder"):
        push_output_dir(tmp_path / "missing", REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []
