"""End-to-end tests of recipes/qlora_dpo.py: the real entry point on the tiny model and small data files.

The recipe runs in-process through `main([...])` / `cli([...])` (imported from its file, as `hf-dpo train`
does), as `python recipes/qlora_dpo.py` with no arguments (the embedded default), and under
`accelerate launch`. Pushes go to the fake Hub of tests/hub_server.py through the real huggingface_hub
client. The model is "hf_dpo/tiny-llama", built once in the session cache that conftest.py sets up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_dpo.card import format_value
from hf_dpo.hub import public_adapter_config

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "qlora_dpo.py"
DEFAULT_ACCELERATE = ROOT / "recipes" / "accelerate_configs" / "default.yaml"
BUNDLED = ROOT / "data" / "dpo_data.jsonl"
LN2 = math.log(2)
TOKEN = "hf_RecipeTestTokenDoNotLeak" + "x" * 12
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
# What a run with an eval split leaves in output_dir (DESIGN.md), and what a push publishes.
RUN_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "trainer_state.json",
    "train_results.json",
    "eval_results.json",
    "all_results.json",
    "training_curves.png",
}
PUSHED = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "training_curves.png",
    "train_results.json",
    "eval_results.json",
    "all_results.json",
}
PUSHED_FROM_CHECKPOINT = PUSHED - {"train_results.json", "eval_results.json", "all_results.json"}
NEVER_PUSHED = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine they mostly wait on each
    other (several times slower); subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe():
    import hf_dpo.recipe

    return hf_dpo.recipe


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """24 pairs in the seed format (the first rows of the bundled data)."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "one_pair.jsonl"
    row = {"prompt": "What is 2 plus 2?", "chosen": " 4, because 2 + 2 = 4.", "rejected": " I am not sure."}
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.fixture
def hub(fake_hub):
    """The fake Hub (tests/hub_server.py) that every push goes to, accepting TOKEN too."""
    fake_hub.tokens.add(TOKEN)
    return fake_hub


def flags(output_dir, data, **overrides) -> list[str]:
    """Flags of a run that takes a few seconds: tiny model, short sequences, a few steps, no checkpoints."""
    settings = {
        "model_name_or_path": "hf_dpo/tiny-llama",
        "dataset_name": str(data),
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "learning_rate": 0.01,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_length": 64,
        "max_prompt_length": 32,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def free_port() -> int:
    """A port nobody listens on (torchrun's --master_port 0 makes the workers wait forever)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_thread_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return path


def read_json(path: Path):
    return json.loads(path.read_text())


def card_results(card_path: Path) -> dict[str, tuple[str, str]]:
    """metric -> (train cell, eval cell) of the card's results table."""
    card = ModelCard.load(card_path)
    assert card.data.library_name == "peft" and "dpo" in card.data.tags
    lines = card.text.split("| Metric | Train | Eval |", 1)[1].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        name, train, evaluation = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (train, evaluation)
    return rows


def pushable_files(folder: Path) -> dict[str, bytes]:
    """The files of `folder` a push publishes, as published: adapter_config.json names a base model loaded
    from a local folder (here the tiny model's build folder) without the folder's path."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name in PUSHED}
    public_config = public_adapter_config(folder)
    if public_config is not None:
        files["adapter_config.json"] = public_config
    return files


def assert_no_secret_or_local_path(files: dict[str, bytes], *paths) -> None:
    for name, data in files.items():
        assert TOKEN.encode() not in data, name
        for path in paths:
            assert str(path).encode() not in data, (name, str(path))


# --------------------------------------------------------------------------------------------- arguments


def test_yaml_only_with_learning_rate_0_is_the_reference_exactly(recipe, pairs, tmp_path):
    """lr 0: the adapter keeps B = 0, so the policy IS the reference: every loss is ln 2 (sigmoid at margin
    0), every reward 0, and no pair counts as ranked correctly (a tie is not correct)."""
    out = tmp_path / "out"
    config = write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": "hf_dpo/tiny-llama",
            "dataset_name": str(pairs),
            "dataset_test_size": 4,
            "output_dir": str(out),
            "learning_rate": 0.0,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "lora_r": 4,
            "lora_dropout": 0.0,
            "max_length": 64,
            "max_prompt_length": 32,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        },
    )
    assert recipe.main([str(config)]) == 0

    evaluation = read_json(out / "eval_results.json")
    assert evaluation["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert evaluation[f"eval_{key}"] == pytest.approx(0.0, abs=1e-6), key
    state = read_json(out / "trainer_state.json")
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2]
    for entry in train_logs:
        assert entry["loss"] == pytest.approx(LN2, abs=1e-4)
        assert entry["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert {p.name for p in out.iterdir()} >= RUN_FILES


def test_yaml_plus_flags_override_the_file(recipe, pairs, tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        {"beta": 0.1, "max_steps": 5, "loss_type": "sigmoid", "lora_r": 8, "output_dir": str(tmp_path / "x")},
    )
    out = tmp_path / "out"
    overrides = [*flags(out, pairs), "--beta", "0.25", "--max_steps", "1", "--loss_type", "ipo"]
    assert recipe.main([str(config), *overrides]) == 0

    run = read_json(out / "hf_dpo_run.json")["training"]
    assert (run["beta"], run["max_steps"], run["global_step"], run["loss_type"]) == (0.25, 1, 1, ["ipo"])
    assert run["lora_r"] == 4  # from the flags, which come after the file
    assert read_json(out / "trainer_state.json")["global_step"] == 1
    assert not (tmp_path / "x").exists()
    assert "| beta, the KL penalty strength (`beta`) | 0.25 |" in (out / "README.md").read_text()
    assert read_json(out / "adapter_config.json")["r"] == 4


def test_flags_only_on_one_pair_logs_what_the_loss_predicts(recipe, one_pair, tmp_path):
    """One pair, every step: the logged loss is -log sigmoid(margin) of the logged reward margin, the
    rewards are beta * (logp - reference logp) where the reference logp is the step-1 logp (B = 0 then),
    and the margin grows."""
    out = tmp_path / "out"
    beta = 0.5
    assert recipe.main(flags(out, one_pair, max_steps=4, beta=beta, learning_rate=0.05)) == 0

    logs = [e for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4]
    first = logs[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    for entry in logs:
        margin = entry["rewards/chosen"] - entry["rewards/rejected"]
        assert entry["rewards/margins"] == pytest.approx(margin, abs=1e-6)
        assert entry["loss"] == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-4)
        assert entry["rewards/chosen"] == pytest.approx(
            beta * (entry["logps/chosen"] - first["logps/chosen"]), abs=1e-3
        )
        assert entry["rewards/rejected"] == pytest.approx(
            beta * (entry["logps/rejected"] - first["logps/rejected"]), abs=1e-3
        )
        assert entry["rewards/accuracies"] == (1.0 if margin > 0 else 0.0)
    assert logs[-1]["rewards/margins"] > logs[1]["rewards/margins"] > 0

    # Only LoRA weights are saved, and they moved from the B = 0 start.
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert not (out / "eval_results.json").exists()  # no eval split was asked for
    assert {"train_results.json", "all_results.json", "README.md", "training_curves.png"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        (["--bta", "0.2"], ["unknown argument --bta", "did you mean --beta?"]),
        (["--beta", "abc"], ["--beta", "invalid float value: 'abc'"]),
        (["--beta", "-1"], ["beta must be > 0"]),
        (
            ["--report_to", "tensorbored"],
            ["report_to: unknown integration 'tensorbored'", "did you mean tensorboard?"],
        ),
        (["--dataset_name", "{missing}"], ["bad preference data", "missing.jsonl", "file not found"]),
        (["--dataset_name", "{bad_json}"], ["bad_json.jsonl, line 2", "invalid JSON"]),
        (["--dataset_name", "{bad_field}"], ["bad_field.jsonl, line 1, field 'chosen'", "expected a string"]),
        (
            ["--dataset_name", "{ranked}"],
            ["ranked.jsonl, line 2, field 'responses'", "3 responses", "loss_type='sigmoid' takes pairs"],
        ),
        (["--push_to_hub", "true", "--hub_model_id", "bad..name"], ["Invalid repo id 'bad..name'"]),
        (["--resume_from_checkpoint", "true"], ["resume_from_checkpoint", "no complete checkpoint"]),
    ],
)
def test_bad_flags_and_data_exit_2_with_one_clear_line(recipe, pairs, tmp_path, capsys, argv_tail, expected):
    (tmp_path / "bad_json.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b" "rejected": "c"}\n'
    )
    (tmp_path / "bad_field.jsonl").write_text('{"prompt": "a", "chosen": 5, "rejected": "c"}\n')
    (tmp_path / "ranked.jsonl").write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "responses": ["x", "y", "z"]}\n'
    )
    names = {name: str(tmp_path / f"{name}.jsonl") for name in ("missing", "bad_json", "bad_field", "ranked")}
    argv_tail = [arg.format(**names) for arg in argv_tail]
    out = tmp_path / "out"

    assert recipe.cli([*flags(out, pairs), *argv_tail]) == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in message
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "config_text, expected",
    [
        ("beta: 0.1\nbta: 0.2\n", ["run.yaml, line 2: unknown argument 'bta' (did you mean beta?)"]),
        (
            "beta: 0.1\nlearning_rate: fast\n",
            ["run.yaml, line 2, field 'learning_rate'", "invalid float value"],
        ),
        ("max_steps: 1\nbeta: -0.5\n", ["run.yaml, line 2, field 'beta'", "beta must be > 0, got -0.5"]),
        ("beta: 0.1\nbeta: 0.2\n", ["run.yaml, line 2: 'beta' is set twice (also on line 1)"]),
        ("beta: [0.1\n", ["run.yaml, line 2: not valid YAML"]),
        ("- beta\n- 0.1\n", ["run.yaml, line 1: expected a mapping"]),
        (None, ["config file not found", "absent.yaml"]),
    ],
)
def test_bad_config_files_exit_2_naming_file_line_and_field(recipe, tmp_path, capsys, config_text, expected):
    config = tmp_path / ("run.yaml" if config_text is not None else "absent.yaml")
    if config_text is not None:
        config.write_text(config_text)
    assert recipe.cli([str(config), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for text in expected:
        assert text in err


@pytest.mark.parametrize(
    "config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_config_parses_to_its_values(config):
    """Including transformers 4 spellings that alignment-handbook configs use (warmup_ratio)."""
    import yaml
    from transformers import HfArgumentParser

    from hf_dpo.config import DataArguments, DPOConfig, ModelArguments
    from hf_dpo.yaml_args import RENAMED, parse_args

    parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
    parsed = parse_args(
        parser, [str(config), "--bf16", "false"]
    )  # the GPU configs ask for bf16; this is a CPU
    for key, value in yaml.safe_load(config.read_text()).items():
        key = RENAMED.get(key, key)
        holder = next(args for args in parsed if hasattr(args, key))
        if key == "report_to":
            assert holder.report_to == ([] if value == "none" else [value])
        elif key == "loss_type" and isinstance(value, str):
            assert holder.loss_type == [value]
        elif key != "bf16":
            assert getattr(holder, key) == value, key


def test_report_to_several_and_warmup_ratio_on_the_command_line():
    from transformers import HfArgumentParser

    from hf_dpo.config import DataArguments, DPOConfig, ModelArguments
    from hf_dpo.yaml_args import parse_args

    parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
    argv = ["--output_dir", "x", "--report_to", "wandb,tensorboard", "--warmup_ratio", "0.25"]
    _, _, args = parse_args(parser, argv)
    assert args.report_to == ["wandb", "tensorboard"] and args.warmup_steps == 0.25


def test_report_to_tensorboard_writes_events_or_says_how_to_install(recipe, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = flags(out, pairs, report_to="tensorboard", max_steps=1)
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        assert recipe.cli(argv) == 2
        err = capsys.readouterr().err
        assert "report_to: tensorboard is not installed; `pip install tensorboard`" in err
        assert not out.exists()
    else:
        assert recipe.cli(argv) == 0
        assert list((out / "runs").rglob("events.out.tfevents.*"))  # transformers' default logging dir


# --------------------------------------------------------------------------------------------- whole runs


def test_default_run_with_no_arguments(tmp_path):
    """`python recipes/qlora_dpo.py` alone: tiny.yaml, the bundled data (found from any cwd), a complete
    output_dir whose card carries the final eval metrics, and a model that learned the preferences."""
    result = subprocess.run(
        [sys.executable, str(RECIPE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
        env=one_thread_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "tiny-dpo"
    assert {p.name for p in out.iterdir()} >= RUN_FILES

    evaluation = read_json(out / "eval_results.json")
    for key in ("loss", *METRICS):
        assert math.isfinite(evaluation[f"eval_{key}"]), key
    margin = evaluation["eval_rewards/chosen"] - evaluation["eval_rewards/rejected"]
    assert evaluation["eval_rewards/margins"] == pytest.approx(margin, abs=1e-6)
    assert evaluation["eval_loss"] < LN2 - 0.05  # it learned which answers are right
    assert evaluation["eval_rewards/accuracies"] > 0.5
    assert read_json(out / "all_results.json")["eval_loss"] == evaluation["eval_loss"]
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 150
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [50, 100, 150, 150]  # eval_steps 50, then the final one
    assert state["log_history"][-1]["eval_loss"] == evaluation["eval_loss"]

    table = card_results(out / "README.md")
    for key in ("loss", *METRICS):
        assert table[key][1] == format_value(evaluation[f"eval_{key}"]), key
    run = read_json(out / "hf_dpo_run.json")
    assert Path(run["datasets"][0]) == BUNDLED
    card = (out / "README.md").read_text()
    assert "local data: `dpo_data.jsonl`" in card and "](training_curves.png)" in card
    published = pushable_files(out)
    assert json.loads(published["adapter_config.json"])["base_model_name_or_path"] == "hf_dpo/tiny-llama"
    assert_no_secret_or_local_path(published, tmp_path, os.environ["HF_DPO_CACHE"], ROOT)


def test_accelerate_launch_with_yaml_and_overrides(pairs, tmp_path):
    out = tmp_path / "out"
    config = write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": "hf_dpo/tiny-llama",
            "dataset_name": str(pairs),
            "dataset_test_size": 4,
            "output_dir": str(out),
            "max_steps": 3,
            "beta": 0.1,
            "lora_r": 4,
            "max_length": 64,
            "max_prompt_length": 32,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": True,
        },
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--config_file",
        str(DEFAULT_ACCELERATE),
    ]  # the README's quick start
    result = subprocess.run(
        [*command, str(RECIPE), str(config), "--max_steps", "2", "--beta", "0.3"],
        capture_output=True,
        text=True,
        timeout=170,
        env=one_thread_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A quiet console: none of the warnings a user cannot act on (accelerate's defaults block, pin_memory on
    # CPU at every evaluation, peft's use of a deprecated transformers property).
    console = result.stdout + result.stderr
    for noise in ("were not passed to `accelerate launch`", "pin_memory", "FutureWarning", "is deprecated"):
        assert noise not in console, noise
    run = read_json(out / "hf_dpo_run.json")["training"]
    assert (run["global_step"], run["beta"], run["world_size"]) == (2, 0.3, 1)
    assert {p.name for p in out.iterdir()} >= RUN_FILES


# --------------------------------------------------------------------------------------------- the Hub


def test_push_to_hub_publishes_exactly_the_adapter_tokenizer_card_and_results(recipe, pairs, hub, tmp_path):
    out = tmp_path / "out"
    argv = flags(out, pairs, dataset_test_size=4, push_to_hub=True, hub_model_id="me/tiny-dpo")
    assert recipe.main([*argv, "--hub_token", TOKEN, "--hub_private_repo", "true"]) == 0

    files = hub.files("me/tiny-dpo")
    assert set(files) == PUSHED
    assert files == pushable_files(out)  # byte for byte what the run left
    assert hub.repos["me/tiny-dpo"].private
    # train() publishes when it ends; the recipe's save_model, after the evaluation, publishes the results too.
    assert [c["summary"] for c in hub.repos["me/tiny-dpo"].commits] == ["End of training", "Model save"]
    assert_no_secret_or_local_path(files, tmp_path, os.environ["HF_DPO_CACHE"], ROOT)
    # The token went out only in Authorization headers, and was never written anywhere locally.
    assert all(TOKEN.encode() not in r.body and TOKEN not in r.path for r in hub.requests)
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    card = ModelCard(files["README.md"].decode())
    assert 'PeftModel.from_pretrained(base, "me/tiny-dpo")' in card.text
    eval_loss = read_json(out / "eval_results.json")["eval_loss"]
    assert card_results(out / "README.md")["loss"][1] == format_value(eval_loss)


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategy_pushes_at_every_save(recipe, pairs, hub, tmp_path, strategy):
    """Saves at steps 1 and 2: each pushes the saved model to the repo root ("Training in progress, step N");
    "checkpoint" also mirrors the checkpoint in last-checkpoint/, "all_checkpoints" in checkpoint-N/. The
    final push adds the results. No optimizer, scheduler, RNG state or training_args.bin ever goes up."""
    out = tmp_path / "out"
    argv = flags(out, pairs, push_to_hub=True, hub_model_id="me/run", hub_strategy=strategy)
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--hub_token", TOKEN]
    assert recipe.main(argv) == 0

    commits = hub.repos["me/run"].commits
    per_save = {
        "every_save": [""],
        "checkpoint": ["", ", checkpoint"],
        "all_checkpoints": ["", ", checkpoint"],
    }
    expected = [
        f"Training in progress, step {step}{suffix}" for step in (1, 2) for suffix in per_save[strategy]
    ]
    # "End of training" holds nothing the step-2 push did not (huggingface_hub skips an empty commit); the
    # recipe's final save_model adds the results files.
    assert [c["summary"] for c in commits] == [*expected, "Model save"]
    first_root = {path for path in commits[0]["files"] if "/" not in path}
    assert first_root == PUSHED_FROM_CHECKPOINT  # the model saved at step 1, before any results exist

    files = hub.files("me/run")
    folders = {path.split("/")[0] for path in files if "/" in path}
    assert (
        folders
        == {
            "every_save": set(),
            "checkpoint": {"last-checkpoint"},
            "all_checkpoints": {
                "checkpoint-1",
                "checkpoint-2",
            },
        }[strategy]
    )
    for folder in folders:
        local = out / ("checkpoint-2" if folder == "last-checkpoint" else folder)
        pushed = {
            path.split("/", 1)[1]: data for path, data in files.items() if path.startswith(folder + "/")
        }
        assert pushed == pushable_files(local), folder
    assert not any(path.endswith(NEVER_PUSHED) for path in files)
    assert {name: data for name, data in files.items() if "/" not in name} == pushable_files(out)
    # Every saved adapter reached the Hub (as an LFS object), the one of step 1 included.
    for step in (1, 2):
        weights = (out / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() in hub.lfs_objects
    assert_no_secret_or_local_path(files, tmp_path, os.environ["HF_DPO_CACHE"], ROOT)


@pytest.mark.parametrize("endpoint, status", [("*", 401), ("create_repo", 403), ("commit", 409)])
def test_hub_refusal_keeps_the_run_and_exits_4(recipe, pairs, hub, tmp_path, capsys, endpoint, status):
    hub.fail(endpoint, status)
    out = tmp_path / "out"
    argv = flags(out, pairs, max_steps=1, push_to_hub=True, hub_model_id="me/tiny-dpo")
    assert recipe.cli([*argv, "--hub_token", TOKEN]) == 4
    err = capsys.readouterr().err
    assert f"HTTP {status}" in err and f"hf-dpo push {out} --repo-id me/tiny-dpo" in err
    assert TOKEN not in err
    assert {"adapter_model.safetensors", "README.md", "train_results.json"} <= {p.name for p in out.iterdir()}
    assert not hub.repos.get("me/tiny-dpo") or hub.files("me/tiny-dpo") == {}


def test_hub_down_during_and_after_training_then_hf_dpo_push_retries(recipe, pairs, hub, tmp_path, capsys):
    """503 on every call: the pushes at each save fail (training goes on), the final one fails, the run exits 4
    with every local artifact; then the printed `hf-dpo push` command publishes the run."""
    hub.fail("*", 503)
    out = tmp_path / "out"
    argv = flags(out, pairs, dataset_test_size=4, push_to_hub=True, hub_model_id="me/later")
    argv += ["--hub_strategy", "every_save", "--save_strategy", "steps", "--save_steps", "1"]
    assert recipe.cli([*argv, "--hub_token", TOKEN]) == 4
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("warning: a push failed: ")]
    assert [line.split(": ", 2)[2].split(" ")[0] for line in failed] == [
        "step",
        "step",
        "end",
    ] and "HTTP 503" in err
    retry = next(line.strip() for line in err.splitlines() if line.strip().startswith("hf-dpo push"))
    assert retry == f"hf-dpo push {out} --repo-id me/later"
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    assert {"checkpoint-1", "checkpoint-2"} <= {p.name for p in out.iterdir()}
    assert "me/later" not in hub.repos

    hub.clear_failures()
    env = one_thread_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN)
    hf_dpo = Path(sys.executable).with_name("hf-dpo")
    result = subprocess.run(
        [str(hf_dpo), *retry.split()[1:]], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pushed {out} to {hub.endpoint}/me/later/commit/")
    assert hub.files("me/later") == pushable_files(out)
    assert set(hub.files("me/later")) == PUSHED


@pytest.mark.slow
def test_a_wheel_carries_the_template_the_configs_and_the_bundled_data(tmp_path):
    """A plain `pip install .` (a wheel) holds copies of the top-level files under hf_dpo/_bundled, found
    through importlib.resources, so `hf-dpo train` runs the embedded default without a checkout; the
    checkout itself has no symlinks."""
    import zipfile

    assert not [
        p for p in ROOT.rglob("*") if p.is_symlink() and ".venv" not in p.parts and ".git" not in p.parts
    ]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("hf_dpo-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped = {
        "model_card_template.md": ROOT / "model_card_template.md",
        "data/dpo_data.jsonl": BUNDLED,
        **{f"recipes/configs/{p.name}": p for p in (ROOT / "recipes" / "configs").glob("*.yaml")},
    }
    for relative, original in shipped.items():
        assert f"hf_dpo/_bundled/{relative}" in names, relative
        assert (tmp_path / "site" / "hf_dpo" / "_bundled" / relative).read_bytes() == original.read_bytes()
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hf_dpo.resources import bundled_file as f; print(f('recipes/configs/tiny.yaml'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert probe.stdout.strip() == str(
        tmp_path / "site" / "hf_dpo" / "_bundled" / "recipes" / "configs" / "tiny.yaml"
    )


# --------------------------------------------------------------------------------------------- launchers and faults


def test_a_full_disk_exits_5_with_the_command_that_resumes(recipe, pairs, tmp_path, capsys, monkeypatch):
    """The tokenizers library reports ENOSPC as a plain Exception: one line naming the folder, the error, the
    last complete checkpoint and the exact command that resumes; the half-written checkpoint is gone."""
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "out"
    argv = flags(out, pairs, max_steps=6, save_strategy="steps", save_steps=2)
    original = PreTrainedTokenizerBase.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if str(folder).endswith("checkpoint-4"):
            raise Exception("No space left on device (os error 28)")
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_pretrained)
    monkeypatch.setattr(sys, "argv", ["recipes/qlora_dpo.py"])
    assert recipe.cli(argv) == 5
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: could not write ") and "Traceback" not in stderr
    assert "No space left on device (os error 28)" in err[0] and "checkpoint-4 was removed" in err[0]
    assert f"The last complete checkpoint is {out / 'checkpoint-2'}" in err[0]
    resume = shlex.split(err[0].split("Resume with: ", 1)[1])
    assert resume[:2] == ["python", "recipes/qlora_dpo.py"] and resume[-2:] == [
        "--resume_from_checkpoint",
        "true",
    ]
    assert not (out / "checkpoint-4").exists()

    monkeypatch.undo()
    assert recipe.cli(resume[2:]) == 0
    assert read_json(out / "trainer_state.json")["global_step"] == 6


def test_exit_codes_under_each_launcher(pairs, tmp_path):
    """python and hf-dpo keep the documented codes; accelerate launch turns any failure into 1 (its own rule),
    and with -q prints nothing but hf_dpo's one line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": 5, "rejected": "c"}\n')
    argv = flags(tmp_path / "out", bad)
    accelerate = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(DEFAULT_ACCELERATE),
    ]
    launchers = {
        "python": ([sys.executable, str(RECIPE)], 2),
        "hf-dpo": ([str(Path(sys.executable).with_name("hf-dpo")), "train"], 2),
        "accelerate -q": ([*accelerate, "-q", str(RECIPE)], 1),
        "accelerate": ([*accelerate, str(RECIPE)], 1),
    }
    for name, (command, code) in launchers.items():
        result = subprocess.run(
            [*command, *argv], capture_output=True, text=True, timeout=120, env=one_thread_env()
        )
        assert result.returncode == code, (name, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert lines == [
            "error: bad preference data: " + f"{bad}, line 1, field 'chosen': expected a string, got int"
        ], name
        if name != "accelerate":
            assert "Traceback" not in result.stderr, name


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "torch.distributed.run"])
def test_two_processes_without_use_cpu_train_as_one_job(pairs, tmp_path, launcher):
    """torchrun on a machine without GPUs and without --use_cpu: one data-parallel job on gloo (never two
    independent runs writing one output_dir): the adapter of 1 process with the doubled batch, to 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(max_steps=3, learning_rate=0.01)
    result = subprocess.run(
        [sys.executable, str(RECIPE), *flags(one, pairs, per_device_train_batch_size=4, **common)],
        capture_output=True,
        text=True,
        timeout=170,
        env=one_thread_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    command = (
        [str(Path(sys.executable).with_name("torchrun"))]
        if launcher == "torchrun"
        else [sys.executable, "-m", "torch.distributed.run"]
    )
    result = subprocess.run(
        [
            *command,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(RECIPE),
            *flags(two, pairs, per_device_train_batch_size=2, **common),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_thread_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert read_json(two / "trainer_state.json")["global_step"] == 3
