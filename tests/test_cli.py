"""Tests of the `hf-dpo` console script: --version, --help, train, eval, merge, push.

`hf-dpo train` and the error paths run the real installed console script in a subprocess; eval, merge and
push also run in-process through `hf_dpo.cli.main` (the function the console script calls) to stay fast.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import hf_dpo
from hf_dpo import cli

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "dpo_data.jsonl"
HF_DPO = Path(sys.executable).with_name("hf-dpo")
LN2 = math.log(2)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
TOKENISATION = ["--max_length", "64", "--max_prompt_length", "32"]


def hf_dpo_command(*args: str, timeout: int = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(HF_DPO), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine they mostly wait on each
    other (several times slower); subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs) -> Path:
    """`hf-dpo train` (the recipe) for 3 steps on 20 pairs, 4 held out, beta 0.25, mean log-probs; its
    output_dir."""
    out = tmp_path_factory.mktemp("train") / "out"
    result = hf_dpo_command(
        "train",
        "--model_name_or_path", "hf_dpo/tiny-llama",
        "--dataset_name", pairs,
        "--dataset_test_size", "4",
        "--output_dir", out,
        "--max_steps", "3",
        "--learning_rate", "0.02",
        "--per_device_train_batch_size", "4",
        "--lora_r", "4",
        "--lora_dropout", "0",
        "--beta", "0.25",
        "--logp_reduction", "mean",
        *TOKENISATION,
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fresh_adapter(tmp_path_factory, tiny_model_path) -> Path:
    """A new LoRA adapter (B = 0) on the tiny model, saved by peft without any training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    out = tmp_path_factory.mktemp("fresh") / "adapter"
    model.save_pretrained(out)
    return out


def test_version_and_help():
    version = hf_dpo_command("--version")
    assert version.returncode == 0 and version.stdout == f"hf_dpo {hf_dpo.__version__}\n"
    for argv in (["--help"], []):
        result = hf_dpo_command(*argv)
        assert result.returncode == 0, result.stderr
        for command in ("train", "eval", "push", "merge"):
            assert command in result.stdout
    unknown = hf_dpo_command("fly")
    assert unknown.returncode == 2 and "invalid choice: 'fly'" in unknown.stderr


def test_train_is_the_recipe(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_model.safetensors", "README.md", "eval_results.json", "all_results.json"} <= names
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((trained / "train_results.json").read_text())["train_loss"] > 0
    assert "3 optimizer steps" in (trained / "README.md").read_text()


def test_eval_of_a_fresh_adapter_is_the_reference(fresh_adapter, pairs, capsys, tmp_path):
    """B = 0: the adapter is the base model, so every pair has margin 0: loss ln 2, rewards 0."""
    adapter = shutil.copytree(fresh_adapter, tmp_path / "adapter")
    argv = ["eval", "--adapter", str(adapter), "--dataset_name", str(pairs), *TOKENISATION]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    # OUT defaults to the adapter folder
    assert json.loads((adapter / "eval_results.json").read_text()) == metrics
    assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    for key in METRICS:
        assert metrics[f"eval_{key}"] == pytest.approx(0.0, abs=1e-6), key
    assert metrics["eval_logps/chosen"] < 0 and metrics["eval_logps/rejected"] < 0


def test_eval_of_the_trained_adapter_repeats_the_runs_own_eval(trained, pairs, tmp_path, capsys):
    """Same held-out rows (dataset_test_size 4, same seed), adapter reloaded from disk, and the run's own beta,
    reduction and lengths (read from its hf_dpo_run.json, not passed here): same numbers. A flag overrides a
    recorded setting: beta 0.1 instead of 0.25 scales every reward by 0.4 and leaves the log-probs alone."""
    argv = ["eval", str(trained), "--dataset_name", str(pairs), "--dataset_test_size", "4"]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    from_run = json.loads((trained / "eval_results.json").read_text())
    for key in ("loss", *METRICS, "logps/chosen", "logps/rejected"):
        assert metrics[f"eval_{key}"] == pytest.approx(from_run[f"eval_{key}"], abs=1e-4), key
    assert metrics["eval_loss"] != pytest.approx(LN2, abs=1e-4)  # it did train
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text()) == metrics

    assert cli.main([*argv, "--output_dir", str(tmp_path / "beta"), "--beta", "0.1"]) == 0
    lower = json.loads(capsys.readouterr().out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert lower[f"eval_{key}"] == pytest.approx(0.4 * metrics[f"eval_{key}"], rel=1e-4, abs=1e-7), key
    for key in ("logps/chosen", "logps/rejected"):
        assert lower[f"eval_{key}"] == pytest.approx(metrics[f"eval_{key}"], abs=1e-5), key

    # Dashed flags are the same options: reference-free, each reward is beta (0.25, recorded) times its log-prob.
    assert cli.main([*argv, "--output-dir", str(tmp_path / "dashed"), "--reference-free", "true"]) == 0
    free = json.loads((tmp_path / "dashed" / "eval_results.json").read_text())
    for side in ("chosen", "rejected"):
        assert free[f"eval_rewards/{side}"] == pytest.approx(0.25 * free[f"eval_logps/{side}"], rel=1e-5), (
            side
        )


def test_merge_gives_the_logits_of_base_plus_adapter(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo.tiny import resolve_model_path

    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", str(trained), "--out", str(merged_dir), "--dtype", "float32"]) == 0
    assert f"merged model saved in {merged_dir}" in capsys.readouterr().out
    assert not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base_name = json.loads((trained / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(["Question: What is 85 minus 7? Answer: 78."], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(trained)).eval()
        expected = adapted(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes something worth checking


def test_push_errors(trained, tmp_path, monkeypatch, capsys):
    missing = hf_dpo_command("push", tmp_path / "nothing", "--repo-id", "me/x", timeout=60)
    assert missing.returncode == 2
    assert "is not a folder: nothing to push" in missing.stderr and "Traceback" not in missing.stderr

    assert cli.main(["push", str(trained), "--repo-id", "bad..name"]) == 2
    assert "Invalid repo id 'bad..name'" in capsys.readouterr().err

    with socket.socket() as sock:  # a port nobody listens on: the Hub is unreachable
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main(["push", str(trained), "--repo-id", "me/x", "--token", "hf_" + "z" * 34]) == 4
    err = capsys.readouterr().err
    assert "could not reach" in err and f"hf-dpo push {trained} --repo-id me/x" in err
    assert "hf_zzzz" not in err


def test_bad_data_exits_2_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "p", "chosen": "a"}]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = hf_dpo_command(
        "train", "--dataset_name", bad, "--output_dir", tmp_path / "out", "--report_to", "none"
    )
    assert result.returncode == 2
    assert f"error: bad preference data: {bad}, line 3, field 'rejected'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    # The data is checked before the model is loaded: a bad row is reported even when the model could not load.
    missing_model = tmp_path / "no-such-model"
    result = hf_dpo_command(
        "train",
        "--dataset_name",
        bad,
        "--model_name_or_path",
        missing_model,
        "--output_dir",
        tmp_path / "out",
    )
    assert result.returncode == 2
    assert f"{bad}, line 3, field 'rejected'" in result.stderr
    assert str(missing_model) not in result.stderr

    # The same through `hf-dpo eval` (in-process), and an adapter folder that is not one.
    assert cli.main(["eval", str(tmp_path), "--dataset_name", str(bad)]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert cli.main(["merge", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_eval_bad_data_and_bad_flag(fresh_adapter, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n')
    assert cli.main(["eval", str(fresh_adapter), "--dataset_name", str(bad)]) == 2
    assert f"{bad}, line 2: invalid JSON" in capsys.readouterr().err
    assert cli.main(["eval", str(fresh_adapter), "--dataset_nme", str(bad)]) == 2
    assert "unknown argument --dataset_nme (did you mean --dataset_name?)" in capsys.readouterr().err


def test_push_names_a_local_base_model_by_its_folder_name_only(fresh_adapter, tmp_path, fake_hub):
    """peft records where the base was loaded from; the Hub gets its name, never the path on this machine."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(fresh_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    local_base = tmp_path / "models" / "my-base"
    config["base_model_name_or_path"] = str(local_base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    local_base.mkdir(parents=True)

    assert cli.main(["push", str(adapter), "--repo-id", "me/adapter", "--token", fake_hub.token]) == 0
    pushed = fake_hub.files("me/adapter")
    assert set(pushed) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}  # peft's card
    published = json.loads(pushed["adapter_config.json"])
    assert published == {**config, "base_model_name_or_path": "my-base"}
    assert str(tmp_path).encode() not in pushed["adapter_config.json"]
    assert pushed["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads((adapter / "adapter_config.json").read_text()) == config  # the local file is untouched


def test_push_later_renders_the_card_for_the_repo_id_unless_it_was_edited(trained, tmp_path, fake_hub):
    """A run trained without hub_model_id has a card that loads "path/to/adapter"; `hf-dpo push --repo-id`
    publishes it rendered for that repo (from hf_dpo_run.json), leaving the local card alone. A card edited by
    hand goes up byte for byte as it is."""
    import shutil

    from huggingface_hub import ModelCard

    run = shutil.copytree(trained, tmp_path / "run")
    local_card = (run / "README.md").read_bytes()
    assert b'"path/to/adapter"' in local_card
    token = fake_hub.token
    assert cli.main(["push", str(run), "--repo-id", "me/renamed", "--token", token]) == 0
    card = fake_hub.files("me/renamed")["README.md"].decode()
    edited = local_card + b"\nMy own notes.\n"
    (run / "README.md").write_bytes(edited)
    assert cli.main(["push", str(run), "--repo-id", "me/edited", "--token", token]) == 0
    assert fake_hub.files("me/edited")["README.md"] == edited
    assert 'PeftModel.from_pretrained(base, "me/renamed")' in card
    assert "path/to/adapter" not in card
    assert ModelCard(card).data.library_name == "peft"  # still valid Hub metadata
    assert "# renamed" in card  # the title is the repo's name, no longer the output folder's
    assert (
        tmp_path / "run" / "README.md"
    ).read_bytes() == edited  # local files are never rewritten by a push
