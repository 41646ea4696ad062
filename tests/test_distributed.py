"""Data parallel on CPU: the recipe under `accelerate launch` with 2 processes (gloo) against 1 process with the
same global batch, and the reference log-probs precomputed under 2 processes.

Both launches run recipes/qlora_dpo.py through the journaling wrapper of tests/test_reliability.py, so each
rank's batches, card writes, pushes and reference computations can be checked, not only the end result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_reliability import (
    RECIPE,
    REPO,
    TOKEN,
    adapter,
    checkpoints,
    instrumented,
    isolated_env,
    log_history,
    read_journal,
    recipe_flags,
    run,
    write_data,
)

from hf_dpo.losses import METRIC_NAMES

try:
    from hub_server import FakeHub
except ImportError:  # tests/ imported as a package
    from tests.hub_server import FakeHub

ACCELERATE = Path(sys.executable).with_name("accelerate")
DDP_CPU = REPO / "recipes" / "accelerate_configs" / "ddp_cpu.yaml"
TWO_PROCESSES = [ACCELERATE, "launch", "--config_file", DDP_CPU, "--num_processes", "2"]
TOLERANCE = 1e-4


@pytest.mark.parametrize(
    ("name", "kind", "processes", "precision"),
    [
        ("single_gpu", "NO", 1, "bf16"),
        ("multi_gpu", "MULTI_GPU", 2, "bf16"),
        ("ddp_cpu", "MULTI_GPU", 2, "no"),
        ("deepspeed_zero3", "DEEPSPEED", 2, "bf16"),
        ("fsdp_qlora", "FSDP", 2, "bf16"),
    ],
)
def test_accelerate_configs_pass_accelerate_launch_validation(name, kind, processes, precision):
    """Each config goes through `accelerate launch --config_file`'s own parsing and validation (no GPU here, so
    none but ddp_cpu.yaml can be run: that one is, below)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = REPO / "recipes" / "accelerate_configs" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), str(RECIPE)])
    args, defaults, _ = _validate_launch_command(args)
    assert (defaults.distributed_type.value, args.num_processes, args.mixed_precision) == (
        kind,
        processes,
        precision,
    )
    if kind == "DEEPSPEED":
        assert (args.zero_stage, args.zero3_init_flag, args.offload_param_device) == (3, True, "none")
    elif kind in ("MULTI_GPU", "FSDP"):
        env = prepare_multi_gpu_env(args)  # the variables torchrun's workers get
        if kind == "FSDP":  # QLoRA: the 4-bit weights (stored in bf16) are sharded like any bf16 tensor
            assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_USE_ORIG_PARAMS"] == "false"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    if name == "ddp_cpu":
        assert args.multi_gpu and args.use_cpu and defaults.main_process_port == 0
        assert int(args.main_process_port) > 0  # port 0: accelerate picks a free one for each launch


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """The same run twice: 1 process x 8 pairs, and 2 processes x 4 pairs (global batch 8 both times), both
    sharing prompts (the default); and a third time in 1 process with share_prompt=False (not pushed).

    40 rows, 8 held out for evaluation: 4 steps an epoch, 6 steps (so the sampler's second epoch is
    covered), evaluation and a checkpoint (pushed to a fake Hub) every 3 steps.
    """
    root = tmp_path_factory.mktemp("ddp")
    data = write_data(root / "prefs.jsonl")
    wrapper = instrumented(root)
    found = {}
    with FakeHub(tokens=[TOKEN]) as hub:
        for name, launcher, batch in (
            ("one", [sys.executable], 8),
            ("two", TWO_PROCESSES, 4),
            ("one_unshared", [sys.executable], 8),
        ):
            out, journal = root / name, root / f"{name}.journal.jsonl"
            hub_flags = dict(push_to_hub=True, hub_model_id=f"me/{name}", hub_token=TOKEN)
            flags = recipe_flags(
                tiny_model_path,
                data,
                out,
                per_device_train_batch_size=batch,
                per_device_eval_batch_size=batch,
                dataset_test_size=8,
                eval_strategy="steps",
                eval_steps=3,
                save_steps=3,
                **(dict(share_prompt=False) if name == "one_unshared" else hub_flags),
            )
            env = isolated_env(root / f"{name}-env", HF_DPO_TEST_JOURNAL=str(journal), **hub.environment())
            result = run([*launcher, wrapper, RECIPE, *flags], env, timeout=300)
            assert result.returncode == 0, result.stderr[-4000:]
            found[name] = {"out": out, "journal": read_journal(journal), "result": result}
        found["hub"] = hub
    return found


def _logged(out: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value for every train and eval metric logged during training."""
    values = {}
    for entry in log_history(out):
        for key, value in entry.items():
            if (
                key in ("step", "epoch", "total_flos")
                or key.startswith("train_")
                or not isinstance(value, float)
            ):
                continue
            if not key.endswith(("_runtime", "_per_second")):
                values[(entry["step"], key)] = value
    return values


@pytest.mark.slow
def test_two_processes_give_the_metrics_and_adapter_of_one(runs):
    one, two = _logged(runs["one"]["out"]), _logged(runs["two"]["out"])
    assert one.keys() == two.keys()
    names = {key for _, key in one}
    assert {"loss", "grad_norm", *METRIC_NAMES, "eval_loss", *(f"eval_{m}" for m in METRIC_NAMES)} <= names
    assert {step for step, _ in one} == set(range(1, 7))
    metric_diff = max(abs(one[k] - two[k]) for k in one)

    a, b = adapter(runs["one"]["out"]), adapter(runs["two"]["out"])
    assert a.keys() == b.keys()
    adapter_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = min(
        (a[k] - adapter(runs["one"]["out"] / "checkpoint-3")[k]).abs().max().item()
        for k in a
        if "lora_B" in k
    )
    print(
        f"1 vs 2 processes: max abs difference {metric_diff:.2e} in logged metrics, {adapter_diff:.2e} in the adapter"
    )
    # Rewards and log-probs are averaged over all 8 pairs only if they are gathered across ranks: rank 0
    # alone sees 4 of them.
    assert metric_diff <= TOLERANCE and adapter_diff <= TOLERANCE
    assert moved > 10 * TOLERANCE  # training did move the adapter, so the comparison means something
    run_info = json.loads((runs["two"]["out"] / "hf_dpo_run.json").read_text())["training"]
    assert (run_info["world_size"], run_info["per_device_train_batch_size"]) == (2, 4)


@pytest.mark.slow
def test_two_processes_sharing_prompts_match_one_process_repeating_them(runs):
    """Prompt sharing under DDP (gloo): the 2-process shared run logs the metrics and ends with the adapter of
    the 1-process run that repeats each prompt before every completion."""
    batches = {
        name: [e for e in runs[name]["journal"] if e["event"] == "batch"] for name in ("two", "one_unshared")
    }
    assert batches["two"] and all(e["shared"] for e in batches["two"])
    assert batches["one_unshared"] and not any(e["shared"] for e in batches["one_unshared"])
    assert "share_prompt is off" not in runs["two"]["result"].stderr
    shared, unshared = _logged(runs["two"]["out"]), _logged(runs["one_unshared"]["out"])
    assert shared.keys() == unshared.keys()
    metric_diff = max(abs(shared[k] - unshared[k]) for k in shared)
    a, b = adapter(runs["two"]["out"]), adapter(runs["one_unshared"]["out"])
    adapter_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(
        f"2 processes shared vs 1 unshared: max abs difference {metric_diff:.2e} in metrics, {adapter_diff:.2e} in the adapter"
    )
    assert metric_diff <= TOLERANCE and adapter_diff <= TOLERANCE


@pytest.mark.slow
def test_each_step_splits_the_one_process_batch_between_the_ranks(runs):
    """Same data order (accelerate's seedable sampler): the ranks' micro-batches of step s are the two halves
    of the 1-process batch of step s, in every epoch."""
    one = {e["step"]: e["rows"] for e in runs["one"]["journal"] if e["event"] == "batch"}
    two = [e for e in runs["two"]["journal"] if e["event"] == "batch"]
    assert sorted(one) == list(range(1, 7))
    for step, rows in one.items():
        by_rank = {e["rank"]: e["rows"] for e in two if e["step"] == step}
        assert sorted(by_rank) == [0, 1] and all(len(r) == 4 for r in by_rank.values())
        assert by_rank[0] + by_rank[1] == rows, step


@pytest.mark.slow
def test_only_the_main_process_writes_the_card_and_pushes(runs):
    journal_one, journal_two = runs["one"]["journal"], runs["two"]["journal"]
    for event in ("card", "push"):
        ones = [e for e in journal_one if e["event"] == event]
        twos = [e for e in journal_two if e["event"] == event]
        assert ones and len(twos) == len(ones), event
        assert {e["rank"] for e in twos} == {0}, event
    hub = runs["hub"]
    assert len(hub.requests_to("commit")) == 6  # 2 saves + the final push, for each of the two runs
    assert hub.files("me/one").keys() == hub.files("me/two").keys()
    stderr = runs["two"]["result"].stderr
    assert "find_unused_parameters=True" not in stderr  # LoRA-only DDP, no unused-parameter search


@pytest.mark.slow
def test_precomputed_reference_under_two_processes(tiny_model_path, tmp_path):
    """Each row's reference log-probs are computed once (by one rank), every rank ends with the same full
    column, equal to a 1-process computation, and the cache file is written once, by the main process."""
    data = write_data(tmp_path / "prefs.jsonl")
    journal = tmp_path / "journal.jsonl"
    env = isolated_env(tmp_path, HF_DPO_TEST_JOURNAL=str(journal))
    flags = recipe_flags(
        tiny_model_path,
        data,
        tmp_path / "out",
        precompute_ref_log_probs=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=1,
        save_strategy="no",
    )
    result = run([*TWO_PROCESSES, instrumented(tmp_path), RECIPE, *flags], env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    events = read_journal(journal)

    computed = [(e["rank"], e["indices"]) for e in events if e["event"] == "ref_rows"]
    assert sorted(rank for rank, _ in computed) == [0, 1]
    all_indices = [i for _, indices in computed for i in indices]
    assert sorted(all_indices) == list(range(40))  # every row, once

    seen = [e for e in events if e["event"] == "ref_values"]
    assert sorted(e["rank"] for e in seen) == [0, 1]
    assert seen[0]["values"] == seen[1]["values"] and seen[0]["lines"] == seen[1]["lines"]

    writes = [e for e in events if e["event"] == "save_file" and "ref_logps" in e["path"]]
    assert [e["rank"] for e in writes] == [0]
    cache = Path(env["HF_DPO_CACHE"]) / "ref_logps"
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # one entry, no temporary file left

    from trainer_helpers import dpo_config, load

    from hf_dpo.data import load_preference_data
    from hf_dpo.trainer import DPOTrainer

    loaded = load(tiny_model_path)
    single = DPOTrainer(
        model=loaded.model,
        args=dpo_config(
            tmp_path / "single", max_length=128, max_prompt_length=64, per_device_eval_batch_size=4
        ),
        train_dataset=load_preference_data(data)["train"],
        processing_class=loaded.tokenizer,
    )
    single.model.train()
    reference = {}
    for start in range(0, 40, 8):
        batch = single._prepare_inputs(
            single.data_collator([single.train_dataset[i] for i in range(start, start + 8)])
        )
        for line, row in zip(
            batch["source_line"].tolist(), single.reference_logps(single.model, batch).tolist()
        ):
            reference[line] = row
    got = dict(zip(seen[0]["lines"], seen[0]["values"]))
    assert got.keys() == reference.keys() and len(got) == 40
    assert all(len(row) == 2 and max(row) < 0 for row in got.values())  # chosen and rejected log-probs
    difference = max(abs(a - b) for line in got for a, b in zip(got[line], reference[line]))
    print(f"2-process precomputed vs 1-process live reference log-probs: max abs difference {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_without_hanging(tiny_model_path, tmp_path):
    """Rank 1 alone gets a NaN loss at step 2: both ranks stop before that update (none waits forever in an
    all-reduce), both name the step and the rows of both ranks, and checkpoint-1 is kept."""
    data = write_data(tmp_path / "prefs.jsonl")
    out, journal = tmp_path / "out", tmp_path / "journal.jsonl"
    env = isolated_env(
        tmp_path,
        HF_DPO_TEST_JOURNAL=str(journal),
        HF_DPO_TEST_POISON_STEP="2",
        HF_DPO_TEST_POISON_RANK="1",
    )
    flags = recipe_flags(tiny_model_path, data, out, per_device_train_batch_size=4, max_steps=3)
    result = run([*TWO_PROCESSES, instrumented(tmp_path), RECIPE, *flags], env, timeout=180)
    assert result.returncode != 0
    rows = [r for e in read_journal(journal) if e["event"] == "batch" and e["step"] == 2 for r in e["rows"]]
    assert len(rows) == 8
    stderr = result.stderr.replace("[rank0]:", "").replace("[rank1]:", "")
    rank_rows = {
        e["rank"]: e["rows"] for e in read_journal(journal) if e["event"] == "batch" and e["step"] == 2
    }
    lines = ", ".join(map(str, sorted(rank_rows[0] + rank_rows[1])))
    expected = f"error: non-finite loss at step 2, {data} lines {lines}."
    assert stderr.count(expected) == 2, result.stderr[-4000:]  # printed by each rank
    assert checkpoints(out) == [1]
    assert (out / "checkpoint-1" / "hf_dpo_checkpoint_complete").exists()
