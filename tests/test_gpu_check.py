"""scripts/gpu_check.py: the CPU smoke run passes every stage with the figures the math predicts, and its
machinery (the guard around each check, the longest-sequence search) does what the GPU run relies on.

The smoke run is the CPU image of the GPU run: same functions, toy sizes, fp32, in-process where the GPU run
isolates measurements in fresh processes. Its figures are exact where CPU fp32 is exact (the dequantised twin
runs the very same dequantised matmuls; the resumed run replays the same kernels), so they are asserted exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "scripts" / "gpu_check.py"
LN2 = math.log(2.0)


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, GPU_CHECK, "--device", "cpu", "--smoke", "--out", out],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), result.stderr[-4000:]
    report = json.loads(out.read_text())
    report["_stdout"], report["_returncode"] = result.stdout, result.returncode
    return report


def checks(report: dict, stage: str) -> dict[str, dict]:
    return report["stages"][stage]["checks"]


def named(report: dict, stage: str, fragment: str) -> list[dict]:
    found = [c for name, c in checks(report, stage).items() if fragment in name]
    assert found, f"no {stage} check named like {fragment!r}: {list(checks(report, stage))}"
    return found


@pytest.mark.slow
def test_smoke_run_passes_every_stage_and_says_why_it_skips(smoke):
    assert smoke["_returncode"] == 0, smoke["_stdout"][-3000:]
    assert smoke["passed"] is True
    assert list(smoke["stages"]) == ["correctness", "speed", "longest", "fsdp"]
    allowed_skips = {"needs CUDA", "not available", "needs 2 GPUs"}
    for stage, body in smoke["stages"].items():
        for name, check in body["checks"].items():
            assert check["status"] in ("pass", "skipped"), (stage, name, check)
            if check["status"] == "skipped":
                assert any(check["reason"].startswith(r) for r in allowed_skips), (name, check["reason"])
            assert check["seconds"] >= 0
    skipped = {
        name for s in smoke["stages"].values() for name, c in s["checks"].items() if c["status"] == "skipped"
    }
    assert all("flash-attention" in n or "sharing" in n or "2 GPUs" in n for n in skipped), skipped
    # the table is printed, one row per check
    assert smoke["_stdout"].count("\n| ") == 1 + sum(len(s["checks"]) for s in smoke["stages"].values())
    env = smoke["environment"]
    assert env["cuda_available"] is False and env["gpu"] is None and "flash_attn" in env
    assert all(env[name] for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate"))
    assert smoke["plan"] == {**smoke["plan"], "device": "cpu", "smoke": True, "compute_dtype": "float32"}


@pytest.mark.slow
def test_smoke_correctness_figures(smoke):
    for step0 in named(smoke, "correctness", "step-0 loss"):
        assert step0["status"] == "pass"
        assert abs(step0["loss"] - LN2) <= 1e-6 and abs(step0["eval_loss"] - LN2) <= 1e-6
        assert step0["rewards"] == {"chosen": 0.0, "rejected": 0.0, "margins": 0.0, "accuracies": 0.0}
    twins = named(smoke, "correctness", "dequantised twin")
    assert len(twins) == 4  # two models, after an evaluation pass and after precomputing
    for twin in twins:
        # fp32 on CPU: the 4-bit layer runs the very dequantised matmul the twin runs (no repacking)
        assert twin["gradient_relative_error"] == 0.0 and twin["gradient_norm"] > 0
        assert twin["loss"] == twin["twin_loss"] and twin["loss"] < LN2  # a trained adapter
    for fused in named(smoke, "correctness", "fused LM head"):
        assert fused["logps_relative_error"] <= 1e-6 and fused["gradient_relative_error"] <= 1e-6
    (packed,) = named(smoke, "correctness", "padding-free = padded (hf_dpo varlen sdpa)")
    assert packed["attention_kernel"] == "hf_dpo_varlen"
    assert packed["logps_relative_error"] <= 1e-5 and packed["gradient_relative_error"] <= 1e-4
    (optimizer,) = named(smoke, "correctness", "paged_adamw_8bit")
    assert "bitsandbytes" in optimizer["optimizers"]["paged_adamw_8bit"]
    assert "torch.optim" in optimizer["optimizers"]["adamw_torch"]
    assert optimizer["update_relative_difference"] <= 0.05 and optimizer["base_weights_moved"] is False
    (resume,) = named(smoke, "correctness", "resume after SIGKILL")
    assert resume["killed_with"] == -9 and resume["logged_steps"] == [1, 2, 3, 4, 5, 6]
    assert resume["bit_identical"] is True


@pytest.mark.slow
def test_smoke_speed_and_longest_figures(smoke):
    for reference in ("live", "precomputed"):
        (speed,) = named(smoke, "speed", f"{reference} reference")
        assert speed["reference"] == reference
        for impl in ("hf_dpo", "trl"):
            assert speed[impl]["tokens_per_s"] > 0 and speed[impl]["peak_memory_mib"] > 0
            assert abs(speed[impl]["first_step_loss"] - LN2) <= 1e-4  # same fresh adapter, same rows
        assert speed["tokens_per_s_ratio"] == pytest.approx(
            speed["hf_dpo"]["tokens_per_s"] / speed["trl"]["tokens_per_s"]
        )
    (longest,) = named(smoke, "longest", "longest sequence")
    for impl in ("hf_dpo", "trl"):
        found = longest[impl]
        # smoke: start 16, cap 100, granularity 8: 16, 32, 64 fit, 128 is above the cap; bisection: 96 fits,
        # 112 and 104 are above the cap; 104 - 96 <= 8 stops it
        assert [t["length"] for t in found["tries"]] == [16, 32, 64, 128, 96, 112, 104]
        assert (found["longest"], found["first_failure"], found["limited_by"]) == (96, 104, "above the cap")
        assert [r["length"] for r in found["runs"]] == [16, 32, 64, 96]  # lengths above the cap never run
        assert all(r["outcome"] == "fits" and abs(r["loss"] - LN2) < 1e-5 for r in found["runs"])


@pytest.mark.slow
def test_smoke_fsdp_figures(smoke):
    (fsdp,) = named(smoke, "fsdp", "FSDP2, 2 processes")
    assert fsdp["fused_head"] == {"one": True, "two": False}
    assert fsdp["metric_max_abs_difference"] <= 1e-4 and fsdp["adapter_max_abs_difference"] <= 1e-4
    (two_gpus,) = named(smoke, "fsdp", "2 GPUs")
    assert two_gpus["status"] == "skipped" and two_gpus["reason"].startswith("needs 2 GPUs")


@pytest.mark.slow
def test_the_fresh_process_paths_of_the_gpu_run(tmp_path):
    """What the GPU run does in fresh processes and the smoke run in-process: a measured run through
    benchmarks/common.run_subprocess, and a length search through `gpu_check.py --longest-worker`."""
    gpu_check = load_gpu_check()
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", "cpu", "--smoke"]))
    plan.isolate, plan.speed_steps, plan.search_cap = True, 1, 20
    spec = gpu_check.speed_specs(plan, tmp_path, "live")["hf"]
    measured = gpu_check.measure(plan, spec, tmp_path)
    assert measured["impl"] == "hf" and len(measured["step_times"]) == plan.speed_warmup + 1
    assert measured["wall_s"] > 0  # set by run_subprocess only
    found = gpu_check.search_in_worker(plan, tmp_path, "hf", seconds=300)
    # 16 fits; 32 is above the cap of 20; bisection tries 24 (above it too) and stops: 24 - 16 <= granularity 8
    assert [t["length"] for t in found["tries"]] == [16, 32, 24]
    assert [(r["length"], r["outcome"]) for r in found["runs"]] == [(16, "fits")]
    assert (tmp_path / "longest_hf.log").exists()  # the worker's own output: it ran as a process


# ------------------------------------------------------------------------------ the machinery, in-process


def test_search_doubles_then_bisects_to_the_resolution():
    gpu_check = load_gpu_check()
    limit = 5000
    tried = []

    def try_length(length):
        tried.append(length)
        return "fits" if length <= limit else "out of memory"

    found = gpu_check.search_longest(try_length, start=512, cap=10**6, granularity=128)
    # doubling: 512 .. 4096 fit, 8192 does not; bisection of [4096, 8192] down to max(128, 4096 / 16) = 256
    assert tried[:5] == [512, 1024, 2048, 4096, 8192]
    assert tried[5:] == [6144, 5120, 4608, 4864]
    assert (found["longest"], found["first_failure"], found["limited_by"]) == (4864, 5120, "out of memory")
    assert found["longest"] <= limit < found["first_failure"]
    assert found["first_failure"] - found["longest"] <= max(128, found["longest"] // 16)


def test_search_reports_nothing_fits_the_cap_and_the_time_budget():
    gpu_check = load_gpu_check()
    nothing = gpu_check.search_longest(lambda n: "out of memory", start=1024, cap=10**6, granularity=64)
    assert (nothing["longest"], nothing["first_failure"]) == (None, 1024)
    capped = gpu_check.search_longest(lambda n: "fits", start=1024, cap=4096, granularity=64)
    assert [t["length"] for t in capped["tries"]] == [1024, 2048, 4096, 8192, 6144, 5120, 4608, 4352]
    assert (capped["longest"], capped["limited_by"]) == (4096, "above the cap")
    clock = iter(range(100))
    stopped = gpu_check.search_longest(lambda n: "fits", start=1024, cap=10**6, granularity=64,
                                       out_of_time=lambda: next(clock) >= 3)  # fmt: skip
    assert (stopped["longest"], stopped["first_failure"], stopped["stopped"]) == (4096, None, "time budget")


def test_out_of_memory_errors_are_told_apart_from_other_errors():
    import torch

    gpu_check = load_gpu_check()
    assert gpu_check.is_out_of_memory(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    )
    assert gpu_check.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert gpu_check.is_out_of_memory(MemoryError())
    assert not gpu_check.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not gpu_check.is_out_of_memory(ValueError("out of memory"))  # only allocation errors count


def test_a_failing_check_is_recorded_and_the_next_one_still_runs(tmp_path):
    gpu_check = load_gpu_check()
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", "cpu", "--smoke"]))
    report = gpu_check.Report(tmp_path / "report.json", plan, started=0.0)

    def broken():
        raise KeyError("lm_head")

    report.check("correctness", "broken", broken)
    report.check("correctness", "fine", lambda: {"status": "pass", "summary": "ok"})
    report.skip("fsdp", "two GPUs", "needs 2 GPUs")
    on_disk = json.loads((tmp_path / "report.json").read_text())  # rewritten after every check
    broken_entry = on_disk["stages"]["correctness"]["checks"]["broken"]
    assert broken_entry["status"] == "error" and "KeyError: 'lm_head'" in broken_entry["error"]
    assert "in broken" in broken_entry["traceback"]
    assert on_disk["stages"]["correctness"]["checks"]["fine"]["status"] == "pass"
    assert report.finish() == 1
    final = json.loads((tmp_path / "report.json").read_text())
    assert final["passed"] is False and final["counts"] == {"error": 1, "pass": 1, "skipped": 1}
