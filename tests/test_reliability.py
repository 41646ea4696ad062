"""Issue 7, faults and trust: kill -9 and resume, non-finite steps, flat memory, fuzzed data, secrets, pickle.

Most tests run the real recipe (recipes/qlora_dpo.py) in a subprocess on the tiny model, each with its own
caches, so that "nothing on disk" can be checked file by file. The helpers at the top are shared with
tests/test_distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hf_dpo.callbacks import CHECKPOINT_COMPLETE, resolve_resume_checkpoint
from hf_dpo.data import PreferenceDataError, bundled_data_path, load_preference_data
from hf_dpo.trainer import DPOTrainer

try:
    from hub_server import FakeHub
except ImportError:  # tests/ imported as a package
    from tests.hub_server import FakeHub

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qlora_dpo.py"
SOAK = REPO / "scripts" / "memory_soak.py"
TOKEN = "hf_LeakCanary" + "x7Q9" * 6  # recognisable, and long enough for the Hub's token pattern
TOKEN_CORE = "LeakCanaryx7Q9"  # a piece of it: catches a token cut short or wrapped, too

# Test instrumentation: runs a recipe file unchanged as __main__ after wrapping a few hf_dpo functions so
# that each rank journals what it did (one JSON line per event). HF_DPO_TEST_POISON_STEP=N makes the
# policy log-probs of training step N NaN, i.e. a batch whose loss is not finite (on HF_DPO_TEST_POISON_RANK
# only, if set).
INSTRUMENTED_RECIPE = """
import dataclasses, json, os, runpy, sys

import safetensors.torch
import torch

import hf_dpo.hub
import hf_dpo.reference_cache
import hf_dpo.trainer

JOURNAL = os.environ["HF_DPO_TEST_JOURNAL"]
POISON_STEP = int(os.environ.get("HF_DPO_TEST_POISON_STEP", "0"))
RANK = int(os.environ.get("RANK", "0"))
POISON_HERE = os.environ.get("HF_DPO_TEST_POISON_RANK", str(RANK)) == str(RANK)
Trainer = hf_dpo.trainer.DPOTrainer


def note(event, **data):
    with open(JOURNAL, "a") as handle:
        handle.write(json.dumps({"event": event, "rank": RANK, **data}) + "\\n")


def journaled(owner, name, event, describe):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        note(event, **describe(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


journaled(Trainer, "training_step", "batch", lambda self, model, inputs, *a, **k: {
    "step": self.state.global_step + 1, "rows": inputs["source_line"].tolist(),
    "shared": "shared_layout" in inputs})
journaled(Trainer, "write_model_card", "card", lambda trainer, folder, *a, **k: {"folder": str(folder)})
journaled(hf_dpo.hub, "push_folder", "push", lambda folder, repo_id, **k: {"folder": str(folder)})
journaled(hf_dpo.reference_cache, "_compute_rows", "ref_rows", lambda t, d, indices: {"indices": indices})
journaled(safetensors.torch, "save_file", "save_file", lambda tensors, path, *a, **k: {"path": str(path)})

precompute = hf_dpo.reference_cache.precompute_reference_logps


def precompute_and_note(trainer, dataset):
    result = precompute(trainer, dataset)
    note("ref_values", values=list(result["ref_logps"]), lines=list(result["source_line"]))
    return result


hf_dpo.reference_cache.precompute_reference_logps = precompute_and_note
sequence_logps = Trainer.sequence_logps


def poisoned_sequence_logps(self, model, inputs, **kwargs):
    out = sequence_logps(self, model, inputs, **kwargs)
    if POISON_HERE and torch.is_grad_enabled() and self.state.global_step + 1 == POISON_STEP:
        out = dataclasses.replace(out, logps=out.logps * float("nan"))
    return out


Trainer.sequence_logps = poisoned_sequence_logps
recipe = sys.argv[1]
sys.argv = [recipe, *sys.argv[2:]]
runpy.run_path(recipe, run_name="__main__")
"""


# ------------------------------------------------------------------------------------------------ helpers


def write_data(path: Path, rows: int = 40) -> Path:
    """The first `rows` records of the bundled sample (seed format), so line numbers are file lines."""
    lines = bundled_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def recipe_flags(model: str, data: Path, out: Path, **overrides) -> list[str]:
    """Flags for a short CPU run: 40 rows in batches of 8 (5 steps an epoch), 6 steps, a checkpoint each."""
    settings_ = dict(
        model_name_or_path=model,
        dataset_name=str(data),
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_length=128,
        max_prompt_length=64,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings_.update(overrides)
    flags = []
    for key, value in settings_.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment for a recipe subprocess: every cache under `root`, so all it writes can be checked."""
    env = dict(os.environ)
    for name, folder in (
        ("HF_DPO_CACHE", "hf_dpo"),
        ("HF_HOME", "hf_home"),
        ("HF_DATASETS_CACHE", "datasets"),
    ):
        env[name] = str(root / "caches" / folder)
    # One thread: the tiny model gains nothing from more, and busy-waiting OpenMP threads slow to a crawl when
    # other processes share the cores.
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


def run(command: list, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def instrumented(tmp_path: Path) -> Path:
    path = tmp_path / "instrumented_recipe.py"
    path.write_text(INSTRUMENTED_RECIPE, encoding="utf-8")
    return path


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_recipe():
    import hf_dpo.recipe

    return hf_dpo.recipe


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def log_history(folder: Path) -> list[dict]:
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def train_logs(folder: Path) -> list[dict]:
    return [entry for entry in log_history(folder) if "loss" in entry]


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def assert_good_checkpoint(folder: Path) -> None:
    """Complete, loadable without pickle, finite, and accepted for resuming."""
    assert (folder / CHECKPOINT_COMPLETE).is_file(), folder
    tensors = adapter(folder)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values()), folder
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert resolve_resume_checkpoint(str(folder), str(folder.parent)) == str(folder)


# --------------------------------------------------------------------------------- one uninterrupted run


@pytest.fixture(scope="module")
def baseline(tiny_model_path, tmp_path_factory):
    """The reference run: 6 steps, a checkpoint and a push (to a fake Hub, with a token) at every one."""
    root = tmp_path_factory.mktemp("baseline")
    data = write_data(root / "prefs.jsonl")
    out = root / "out"
    with FakeHub(tokens=[TOKEN]) as hub:
        flags = recipe_flags(
            tiny_model_path, data, out, push_to_hub=True, hub_model_id="me/x", hub_token=TOKEN
        )
        result = run(
            [sys.executable, RECIPE, *flags, "--log_level", "info"],
            isolated_env(root, **hub.environment()),
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return {"root": root, "data": data, "out": out, "result": result, "hub": hub}


def test_no_token_on_disk_in_what_the_hub_received_or_in_the_logs(baseline):
    """--hub_token is used to push, and found nowhere else: no file anywhere the run wrote (output_dir with
    every checkpoint, training_args.bin, the card, trainer_state.json, the caches), no request body, path
    or non-auth header the Hub received, no committed file, no line of stdout/stderr (at log level info)."""
    needles = (TOKEN.encode(), TOKEN_CORE.encode())
    out, hub, result = baseline["out"], baseline["hub"], baseline["result"]

    written = [p for p in baseline["root"].rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in written if out in p.parents}
    assert {"training_args.bin", "README.md", "trainer_state.json", "adapter_config.json"} <= names
    assert {f"checkpoint-{s}/training_args.bin" for s in range(1, 7)} <= names
    assert any("caches/datasets" in p.as_posix() for p in written)  # the caches were used, and are checked
    for path in written:
        content = path.read_bytes()
        assert not any(needle in content for needle in needles), f"token written to {path}"
    stored_args = torch.load(
        out / "training_args.bin", weights_only=False
    )  # our own file: unpickling is fine
    assert stored_args.hub_token is None

    api_calls = [r for r in hub.requests if r.endpoint not in ("lfs_upload", "lfs_complete")]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    for request in hub.requests:
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        sent = json.dumps(headers).encode() + request.path.encode() + json.dumps(request.query).encode()
        assert not any(needle in sent + request.body for needle in needles), request.path
    pushed = hub.files("me/x")
    assert {"adapter_model.safetensors", "README.md", "adapter_config.json"} <= set(pushed)
    assert len(hub.requests_to("commit")) == 7  # a push at each of the 6 saves, then the final one
    for name, content in pushed.items():
        assert not any(needle in content for needle in needles), name

    assert "hf_dpo" in result.stdout + result.stderr  # info logs were on
    for needle in (TOKEN, TOKEN_CORE):
        assert needle not in result.stdout and needle not in result.stderr


# ---------------------------------------------------------------------------------------- kill -9, resume


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    baseline, tiny_model_path, tmp_path
):
    """SIGKILL either while checkpoint-k is being written or a moment after it is complete (k random, at most 4
    of 6 steps), then `--resume_from_checkpoint true`. HF_DPO_KILL_SEED=n replays a failure."""
    seed = int(os.environ.get("HF_DPO_KILL_SEED", random.randrange(10_000)))
    rng = random.Random(seed)
    mid_save, delay = rng.random() < 0.5, rng.uniform(0.0, 0.3)
    step = rng.randint(2 if mid_save else 1, 4)  # at least one checkpoint is complete to resume from
    when = "as soon as it appears" if mid_save else f"{delay:.2f} s after it is complete"
    print(f"kill seed {seed}: SIGKILL at checkpoint-{step}, {when}")
    out = tmp_path / "out"
    env = isolated_env(tmp_path)
    command = [sys.executable, RECIPE, *recipe_flags(tiny_model_path, baseline["data"], out)]
    trigger = out / f"checkpoint-{step}" / ("" if mid_save else CHECKPOINT_COMPLETE)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([str(c) for c in command], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not trigger.exists():
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.005)
            if not mid_save:
                time.sleep(delay)
            # Two more steps, each with a save, are left: the run cannot have finished.
            assert process.poll() is None and not (out / "adapter_model.safetensors").exists()
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    complete = [s for s in checkpoints(out) if (out / f"checkpoint-{s}" / CHECKPOINT_COMPLETE).exists()]
    print(f"killed with checkpoint folders {checkpoints(out)}, the complete ones {complete}")

    resumed = run([*command, "--resume_from_checkpoint", "true"], env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    expected, got = adapter(baseline["out"]), adapter(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key  # bit-identical on CPU with fixed seeds
    steps = [entry["step"] for entry in train_logs(out)]
    assert steps == list(range(1, 7))  # no gap, no duplicate
    for ours, theirs in zip(train_logs(out), train_logs(baseline["out"])):
        assert {k: ours[k] for k in ("loss", "grad_norm", "rewards/margins")} == {
            k: theirs[k] for k in ("loss", "grad_norm", "rewards/margins")
        }


# ------------------------------------------------------------------------------------- non-finite steps


def test_learning_rate_inf_exits_3_naming_step_and_rows_and_saves_nothing_non_finite(
    tiny_model_path, tmp_path
):
    """The first update with lr=inf turns the weights to inf from finite gradients: the run stops there, before
    that step's checkpoint, with exit code 3 and the step and data lines in one message."""
    data = write_data(tmp_path / "prefs.jsonl")
    out = tmp_path / "out"
    flags = recipe_flags(tiny_model_path, data, out, learning_rate="inf", max_steps=3)
    result = run([sys.executable, RECIPE, *flags], isolated_env(tmp_path))
    assert result.returncode == 3, result.stderr[-3000:]
    match = re.search(
        r"error: non-finite weights after the update of step 1, \S*prefs\.jsonl lines ([\d, ]+) \(learning rate inf\)",
        result.stderr,
    )
    assert match, result.stderr[-3000:]
    rows = [int(x) for x in match.group(1).split(",")]
    assert len(rows) == len(set(rows)) == 8 and all(1 <= r <= 40 for r in rows)
    assert "learning rate inf" in result.stderr and "Traceback" not in result.stderr
    assert checkpoints(out) == [] and not (out / "adapter_model.safetensors").exists()


def test_non_finite_loss_stops_with_exit_3_and_keeps_every_earlier_checkpoint(tiny_model_path, tmp_path):
    data = write_data(tmp_path / "prefs.jsonl")
    out, journal = tmp_path / "out", tmp_path / "journal.jsonl"
    env = isolated_env(tmp_path, HF_DPO_TEST_JOURNAL=str(journal), HF_DPO_TEST_POISON_STEP="3")
    result = run(
        [sys.executable, instrumented(tmp_path), RECIPE, *recipe_flags(tiny_model_path, data, out)], env
    )
    assert result.returncode == 3, result.stderr[-3000:]
    poisoned = [e["rows"] for e in read_journal(journal) if e["event"] == "batch" and e["step"] == 3]
    assert len(poisoned) == 1
    lines = ", ".join(map(str, sorted(poisoned[0])))
    expected = f"error: non-finite loss at step 3, {data} lines {lines}. The run stopped"
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert checkpoints(out) == [1, 2]  # nothing saved at or after the bad step
    for step in (1, 2):
        assert_good_checkpoint(out / f"checkpoint-{step}")
    assert resolve_resume_checkpoint(True, str(out)) == str(out / "checkpoint-2")
    assert log_history(out / "checkpoint-2")[-1]["step"] == 2


def test_skip_option_skips_the_non_finite_batch_and_counts_it(tiny_model_path, tmp_path, monkeypatch):
    """--nonfinite_action skip (the recipe in-process): step 3's batch has a NaN loss; no weight moves at that
    step (checkpoints 2 and 3 are equal), the logs count it, and the run finishes."""
    import dataclasses

    original = DPOTrainer.sequence_logps

    def poisoned(self, model, inputs, **kwargs):
        out = original(self, model, inputs, **kwargs)
        if torch.is_grad_enabled() and self.state.global_step + 1 == 3:
            out = dataclasses.replace(out, logps=out.logps * float("nan"))
        return out

    monkeypatch.setattr(DPOTrainer, "sequence_logps", poisoned)
    data = write_data(tmp_path / "prefs.jsonl")
    out = tmp_path / "out"
    flags = recipe_flags(tiny_model_path, data, out, max_steps=4, nonfinite_action="skip")
    assert load_recipe().cli(flags) == 0
    logs = {entry["step"]: entry for entry in train_logs(out)}
    assert [logs[s].get("nonfinite_batches_skipped", 0) for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert logs[3]["grad_norm"] == 0.0  # no gradient reached the optimizer
    before, after = adapter(out / "checkpoint-2"), adapter(out / "checkpoint-3")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], adapter(out)[k]) for k in after)  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in adapter(out).values())
    assert "rewards/margins" not in logs[3]  # the skipped batch adds nothing to the metrics ...
    assert all(math.isfinite(v) for entry in logs.values() for v in entry.values())  # ... so none is NaN


# ---------------------------------------------------------------------------------------- flat memory


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(tiny_model_path, tmp_path):
    """RSS after 1,000 steps is within 5% of RSS after 200 (scripts/memory_soak.py; 2,000 steps there)."""
    report = tmp_path / "soak.json"
    result = run(
        [
            sys.executable,
            SOAK,
            "--model",
            tiny_model_path,
            "--steps",
            1000,
            "--baseline_step",
            200,
            "--json",
            report,
        ],
        isolated_env(tmp_path),
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(report.read_text())
    print(
        f"RSS {figures['rss_baseline_mib']:.1f} MiB at step 200 -> {figures['rss_end_mib']:.1f} MiB at 1000"
    )
    assert figures["steps"] == 1000
    assert figures["growth_percent"] < 5.0, figures


# ---------------------------------------------------------------------------------- secrets and trust


@pytest.mark.parametrize("repo_id", ["../../x", "me/../../x", "/etc/x", "me/x/y", "..", "me/x\\..\\y"])
def test_repo_ids_that_could_escape_are_refused(repo_id):
    from hf_dpo.hub import PushRefusedError, check_repo_id

    with pytest.raises(PushRefusedError, match="Invalid repo id"):
        check_repo_id(repo_id)


def test_recipe_refuses_an_escaping_hub_model_id_before_training(tiny_model_path, tmp_path, capsys):
    data = write_data(tmp_path / "prefs.jsonl")
    out = tmp_path / "a" / "b" / "out"
    flags = recipe_flags(
        tiny_model_path, data, out, push_to_hub=True, hub_model_id="../../x", hub_token=TOKEN
    )
    assert load_recipe().cli(flags) == 2
    err = capsys.readouterr().err
    assert "Invalid repo id '../../x'" in err and TOKEN not in err
    assert checkpoints(out) == [] and not (out / "adapter_model.safetensors").exists()  # no step was run
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "x").exists()


def _malicious_pickle(path: Path, canary: Path) -> None:
    """A pickle that creates `canary` when unpickled (as a real attack would run code)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    path.write_bytes(pickle.dumps(Payload(), protocol=2))  # the protocol torch.save uses


def test_adapters_base_weights_and_data_load_without_pickle(tiny_model_path, tmp_path):
    """Where a safetensors file exists next to a pickle, the safetensors one is read; a pickle-only adapter is
    refused by the weights-only loader; a pickle data file is not data."""
    from trainer_helpers import load, model_args

    from hf_dpo.modeling import load_model

    canary = tmp_path / "pickle_was_executed"
    saved = tmp_path / "adapter"
    load(tiny_model_path).model.save_pretrained(saved)
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "adapter_model.bin").exists()
    _malicious_pickle(saved / "adapter_model.bin", canary)

    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    assert (base / "model.safetensors").exists()
    _malicious_pickle(base / "pytorch_model.bin", canary)
    loaded = load_model(model_args(str(base), adapter_name_or_path=str(saved)), use_cpu=True)
    assert "default" in loaded.model.peft_config and not canary.exists()

    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_model(model_args(tiny_model_path, adapter_name_or_path=str(saved)), use_cpu=True)
    assert not canary.exists()

    _malicious_pickle(tmp_path / "prefs.pkl", canary)
    with pytest.raises(PreferenceDataError, match="unsupported file type"):
        load_preference_data(tmp_path / "prefs.pkl")
    folder = tmp_path / "data_folder"
    folder.mkdir()
    write_data(folder / "train.jsonl", rows=4)
    _malicious_pickle(folder / "train.pkl", canary)
    assert len(load_preference_data(folder)["train"]) == 4
    assert not canary.exists()


def test_trust_remote_code_is_off_unless_turned_on(tiny_model_path, tmp_path):
    """A model folder whose config points at custom code: the default never imports it; only
    trust_remote_code=True does (the positive control shows the canary works)."""
    from transformers import AutoConfig, HfArgumentParser

    from hf_dpo.config import DataArguments, DPOConfig, ModelArguments
    from hf_dpo.modeling import load_model

    parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
    model_args, _, _ = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path / "o")])
    assert model_args.trust_remote_code is False and ModelArguments().trust_remote_code is False

    canary = tmp_path / "remote_code_ran"
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    (folder / "custom_code.py").write_text(
        f"open({str(canary)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    pass\n\n\n"
        "class CustomLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForCausalLM": "custom_code.CustomLM",
    }
    (folder / "config.json").write_text(json.dumps(config))

    model_args.model_name_or_path, model_args.lora_r = str(folder), 4
    load_model(model_args, use_cpu=True)
    assert not canary.exists()
    AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert canary.exists()


# ------------------------------------------------------------------------------------- fuzzed data files

# tests/test_data_sources.py fuzzes .jsonl files (random bytes, random JSON, wrong types, near-valid rows) and has
# a 2 MB line and 200,000-deep nesting. Here: the other file types, under a time limit (a hang fails).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(["chose", "chosen", "rejected", "prompt", "responses", "scores"])
RECORDS = st.dictionaries(FIELDS, JSON_VALUES | st.text(min_size=1, max_size=20), max_size=4)
CONTENT = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.lists(RECORDS, max_size=4).map(lambda rows: json.dumps(rows).encode()),
    st.lists(RECORDS, min_size=1, max_size=3).map(lambda rows: json.dumps({"data": rows}).encode()),
    st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4), max_size=4).map(
        lambda table: "\n".join(",".join(map(json.dumps, row)) for row in table).encode()
    ),
    st.builds(lambda n: ("prompt,chosen,rejected\n" + "P,a " * n + ",b\n").encode(), st.integers(0, 50_000)),
)


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(content=CONTENT, suffix=st.sampled_from([".json", ".csv", ".parquet"]))
def test_fuzz_other_file_types_raise_only_preference_data_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    try:
        load_preference_data(path, cache_dir=path.parent / "cache")
    except PreferenceDataError as err:
        assert err.path == str(path)
