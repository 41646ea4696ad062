"""hf_dpo.config: defaults that compose, options a setting would ignore refused in one line, and a sweep of the
documented options where every combination either trains or is refused when the flags are parsed."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from transformers import HfArgumentParser

from hf_dpo.config import DataArguments, DPOConfig, ModelArguments
from hf_dpo.losses import LOSS_TYPES, accepts_ranked
from hf_dpo.yaml_args import flag_name, parse_args, without_option

PARSER = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
BASE = ["--output_dir", "unused", "--use_cpu", "true", "--report_to", "none"]


def _parse(flags: dict) -> tuple:
    argv = list(BASE)
    for key, value in flags.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return parse_args(PARSER, argv)


@pytest.mark.parametrize("max_length", [32, 64, 128, 512, 4096])
def test_one_length_flag_alone_works(max_length):
    """--max_length 512 alone used to collide with the default max_prompt_length 512 (TRL dropped the option)."""
    _, _, args = _parse({"max_length": max_length})
    assert (args.max_length, args.max_prompt_length) == (max_length, None)
    _, _, args = _parse({"max_prompt_length": 100})
    assert (args.max_length, args.max_prompt_length) == (1024, 100)


def test_flags_are_named_in_either_spelling_and_an_option_leaves_with_its_value():
    """argparse reads --max-length and --max_length alike; so must the code that looks for a flag in argv."""
    names = [flag_name(a) for a in ("--max-length=9", "--max_length", "9", "-h")]
    assert names == ["max_length", "max_length", None, None]
    argv = ["c.yaml", "--resume_from_checkpoint", "out/checkpoint-2", "--beta", "0.2"]
    argv += ["--resume-from-checkpoint=x"]
    assert without_option(argv, "resume_from_checkpoint") == ["c.yaml", "--beta", "0.2"]


def test_both_lengths_must_leave_room_for_the_completion():
    with pytest.raises(ValueError, match=r"max_prompt_length \(64\) must be smaller than max_length \(64\)"):
        _parse({"max_length": 64, "max_prompt_length": 64})


def test_launched_processes_on_a_cpu_machine_train_data_parallel(monkeypatch):
    """torchrun sets WORLD_SIZE; without a GPU the run must be one DDP job on CPU, not N separate runs."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DPOConfig(output_dir="x", report_to=[]).use_cpu is False
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(DPOConfig, "__post_init__", _post_init_without_devices(DPOConfig.__post_init__))
    assert DPOConfig(output_dir="x", report_to=[]).use_cpu is True


def _post_init_without_devices(post_init):
    """Run DPOConfig's own checks but not the device setup, which would wait for a second process."""
    from transformers import TrainingArguments

    def patched(self):
        original = TrainingArguments.__post_init__
        TrainingArguments.__post_init__ = lambda self: None
        try:
            post_init(self)
        finally:
            TrainingArguments.__post_init__ = original

    return patched


# ---------------------------------------------------------------------------------------------- the sweep

LENGTHS = [  # (max_length, max_prompt_length): default, one set alone, small, both set, conflicting
    {},
    {"max_length": 512},
    {"max_length": 64},
    {"max_length": 64, "max_prompt_length": 32},
    {"max_length": 64, "max_prompt_length": 64},
]
AXES = {
    "loss_type": LOSS_TYPES,
    "logp_reduction": ("sum", "mean"),
    "reference_free": (False, True),
    "precompute_ref_log_probs": (False, True),
    "padding_free": (False, True),
    "pad_to_multiple_of": (None, 8),
    "lengths": range(len(LENGTHS)),
}


def _combinations():
    for values in itertools.product(*AXES.values()):
        combo = dict(zip(AXES, values))
        flags = {k: v for k, v in combo.items() if k != "lengths" and v not in (None, False)}
        flags.update(LENGTHS[combo["lengths"]])
        if flags["loss_type"] == "exo_pair":
            flags["label_smoothing"] = 0.01  # exo needs it (its refusal without it is tested in test_losses)
        yield flags


def _outcome(flags: dict) -> str | None:
    """None when the flags parse, else the one-line refusal."""
    try:
        _parse(flags)
    except ValueError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def sweep() -> dict[str, list]:
    accepted, refused = [], []
    for flags in _combinations():
        message = _outcome(flags)
        (accepted if message is None else refused).append((flags, message))
    return {"accepted": accepted, "refused": refused}


def test_every_combination_parses_or_is_refused_in_one_line_naming_its_flags(sweep):
    assert len(sweep["accepted"]) + len(sweep["refused"]) == math.prod(len(v) for v in AXES.values())
    assert sweep["accepted"] and sweep["refused"]
    for flags, message in sweep["refused"]:
        assert "\n" not in message and "Traceback" not in message, flags
        named = [name for name in flags if name in message and name != "loss_type"]
        assert named or flags["loss_type"] in message, (flags, message)


def test_the_refusals_are_the_documented_conflicts(sweep):
    """Each refusal has a reason a user can act on: these combinations, and only these, are refused."""
    from hf_dpo.losses import LOSSES, needs_reference

    for flags, message in sweep["refused"] + sweep["accepted"]:
        loss = flags["loss_type"]
        expected = (
            flags.get("max_prompt_length", 0) >= flags.get("max_length", math.inf)
            or (flags.get("padding_free") and flags.get("pad_to_multiple_of"))
            or (flags.get("reference_free") and flags.get("precompute_ref_log_probs"))
            or (
                (flags.get("reference_free") or flags.get("precompute_ref_log_probs"))
                and not needs_reference(loss)
            )
            or (flags.get("reference_free") and not LOSSES[loss].reference)
            or (flags.get("logp_reduction") == "mean" and LOSSES[loss].length_normalised)
        )
        assert bool(message) == bool(expected), (flags, message)


def _train_two_steps(
    tiny_model_path, tmp_path, flags: dict, quantization: str, gradient_checkpointing, accumulation
):
    from datasets import Dataset

    from hf_dpo.modeling import load_model
    from hf_dpo.trainer import DPOTrainer

    ranked = accepts_ranked(flags["loss_type"]) and flags["loss_type"] != "sft"
    rows = []
    for i in range(8):
        prompt = f"Question {i}: " + "what is the sum of the numbers " * 6 + f"{i} and {i + 2}?"
        if ranked:
            rows.append(
                {"prompt": prompt, "responses": [f" It is {2 * i + 2}.", " Maybe seven.", " No idea at all."]}
            )
        else:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": f" It is {2 * i + 2}.",
                    "rejected": " I do not know" + " really" * i,
                }
            )
    settings = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "gradient_checkpointing": gradient_checkpointing,
        "gradient_accumulation_steps": accumulation,
        "disable_tqdm": True,
        "logging_steps": 1,
        **flags,
        "output_dir": str(tmp_path),
    }
    model_args, _, args = _parse(settings)
    model_args.model_name_or_path = tiny_model_path
    model_args.load_in_4bit = quantization == "4bit"
    model_args.load_in_8bit = quantization == "8bit"
    model_args.lora_r, model_args.lora_alpha = 4, 8
    torch.manual_seed(0)
    loaded = load_model(model_args, use_cpu=True, gradient_checkpointing=gradient_checkpointing)
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=loaded.tokenizer,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (flags, losses)


@pytest.mark.slow
def test_a_sample_of_the_accepted_combinations_trains(sweep, tiny_model_path, tmp_path):
    """Real steps for a seeded sample, every quantisation and the other axes (checkpointing, accumulation)."""
    sample = random.Random(0).sample(sweep["accepted"], 9)
    extra = itertools.cycle(itertools.product(("4bit", "8bit", "full"), (False, True), (1, 2)))
    for number, (flags, _) in enumerate(sample):
        quantization, checkpointing, accumulation = next(extra)
        _train_two_steps(
            tiny_model_path, tmp_path / str(number), flags, quantization, checkpointing, accumulation
        )
