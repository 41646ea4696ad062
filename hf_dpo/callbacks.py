"""TrainerCallbacks that let a run go unattended: the non-finite guard, the checkpoint-complete marker, and
pushes to the Hub at every save (`hub_strategy`). They use transformers' public callback events only."""

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "hf_dpo_checkpoint_complete"


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss, gradient or weight (the message names the step and the data rows)."""


class NonFiniteGuard(TrainerCallback):
    """Stops the run (or, with nonfinite_action=skip, skips the update) when a step's loss or gradients are
    not finite, and before saving weights an update made non-finite. `end_of_step` decides once per optimizer
    step, before clipping, all ranks agreeing (one rank raising alone would hang the rest in all-reduce)."""

    def __init__(self, accelerator, describe_rows):
        self.accelerator = accelerator
        self.describe_rows = describe_rows  # source lines -> "dpo_data.jsonl lines 3, 7"
        self.fault: str | None = None  # "loss" or "gradient": what went non-finite in the step in progress
        self.rows: list[int] = []  # data lines of the step in progress
        self.last_rows: list[int] = []  # ... and of the last finished step
        self.skipped = 0

    def observe(self, loss: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.rows.extend(rows.tolist() if rows is not None else [])
        if not torch.isfinite(loss.detach()):
            self.fault = self.fault or "loss"

    def end_of_step(self, args, state, model) -> None:
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        fault = self.fault or (None if all_finite(grads) else "gradient")
        rows = self.last_rows = self.rows
        self.fault, self.rows = None, []
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([0.0 if fault is None else 1.0], device=args.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                gathered = gather_object([(fault, rows)])
                fault = next((f for f, _ in gathered if f == "loss"), "gradient")
                rows = [row for _, rank_rows in gathered for row in rank_rows]
        if fault is None:
            return
        where = f"step {state.global_step + 1}, {self.describe_rows(rows)}"
        if args.nonfinite_action == "skip":
            self.skipped += 1
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
            logger.warning("non-finite %s at %s: batch skipped (%d so far)", fault, where, self.skipped)
            return
        raise NonFiniteLossError(
            f"non-finite {fault} at {where}. The run stopped before this update; checkpoints saved so far "
            "are kept. Check those rows, lower the learning rate, or set nonfinite_action=skip to skip such "
            "batches."
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Before any log or save: an update can overflow from finite gradients (e.g. a learning rate of inf).
        trained = [p for p in model.parameters() if p.requires_grad]
        if args.nonfinite_action == "stop" and not all_finite(trained):
            rate = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
            raise NonFiniteLossError(
                f"non-finite weights after the update of step {state.global_step}, "
                f"{self.describe_rows(self.last_rows)} (learning rate {rate}). The run stopped before saving "
                "them; checkpoints saved so far are kept. Lower the learning rate."
            )


class CheckpointMarker(TrainerCallback):
    """Marks each saved checkpoint complete: one lacking the marker was cut short and is never resumed."""

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_COMPLETE
        if args.should_save and path.parent.is_dir():
            with open(f"{path}.tmp", "w") as handle:
                handle.write("complete\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(f"{path}.tmp", path)


class HubPushAtSave(TrainerCallback):
    """Pushes at each save, per `hub_strategy`: "every_save" the adapter, tokenizer and card to the repo root;
    "checkpoint" also the checkpoint (less optimizer, scheduler, RNG states) into `last-checkpoint/`, and
    "all_checkpoints" into `checkpoint-N/`. A failed push is logged, kept in `failures`; training goes on."""

    def __init__(self, push, strategy: str):
        self.push = push  # (folder, path_in_repo, commit_message) -> None, raising HubPushError
        self.strategy = strategy
        self.failures: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.strategy == "end" or not args.should_save or not checkpoint.is_dir():
            return
        when = f"epoch {int(state.epoch)}" if args.save_strategy == "epoch" else f"step {state.global_step}"
        targets = [(None, f"Training in progress, {when}")]
        if self.strategy in ("checkpoint", "all_checkpoints"):
            folder = "last-checkpoint" if self.strategy == "checkpoint" else checkpoint.name
            targets.append((folder, f"Training in progress, {when}, checkpoint"))
        from .hub import HubPushError

        for path_in_repo, commit_message in targets:
            try:
                self.push(checkpoint, path_in_repo, commit_message)
            except HubPushError as err:
                what = f"{path_in_repo}/" if path_in_repo else "the model"
                first_line = str(err).splitlines()[0]
                logger.warning("push of %s at step %d failed: %s", what, state.global_step, first_line)
                self.failures.append(f"step {state.global_step} ({what}): {first_line}")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if every element of every tensor is finite; one device sync, however many tensors."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N in output_dir whose save finished (half-written ones are skipped)."""
    markers = Path(output_dir).glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}")
    steps = [int(m.group(1)) for p in markers if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_resume_checkpoint(resume, output_dir: str):
    """True / "true" / "last" -> the last complete checkpoint; a path -> itself, if complete; else None."""
    if resume in (None, False, "", "false", "False", "no"):
        return None
    if resume is True or str(resume).lower() in ("true", "last", "auto"):
        if (found := last_complete_checkpoint(output_dir)) is None:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        logger.info("resuming from %s", found)
        return found
    if not os.path.isfile(os.path.join(resume, CHECKPOINT_COMPLETE)):
        latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume)))
        raise ValueError(
            f"resume_from_checkpoint: {resume} is not a complete hf_dpo checkpoint (its save was cut short or it "
            f"is not a checkpoint); the last complete one is {latest}"
        )
    return resume


class SaveError(RuntimeError):
    """Writing a checkpoint or the final adapter failed (disk full, permissions, quota). The message names the
    folder, the error, what happened to a half-written checkpoint, and the last complete one to resume from."""

    def __init__(self, message: str, last_checkpoint: str | None):
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


# What a full disk, a quota, a read-only or foreign-owned folder or a failing device raise while writing.
_MACHINE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}


def as_save_error(err: BaseException, output_dir: str, step: int) -> SaveError | None:
    """A SaveError for a machine fault met while saving step `step` (an OSError, or the tokenizers library's
    "... (os error 28)"), with the half-written checkpoint-`step` removed; None for anything else."""
    os_fault = isinstance(err, OSError) and err.errno in _MACHINE_FAULTS
    if isinstance(err, SaveError) or not (os_fault or re.search(r"\(os error (\d+)\)", str(err))):
        return None
    folder = Path(output_dir) / f"checkpoint-{step}"
    where, removed = Path(getattr(err, "filename", None) or output_dir), ""
    if folder.is_dir() and not (folder / CHECKPOINT_COMPLETE).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # half-written: never resumed from; removing it frees space
        where, removed = folder, f" The half-written {folder.name} was removed."
    reason = f"{err.strerror} [errno {err.errno}]" if isinstance(err, OSError) and err.strerror else str(err)
    if last := last_complete_checkpoint(output_dir):
        advice = f" The last complete checkpoint is {last}: fix the cause, then resume from it (resume_from_checkpoint=true)."
    else:
        advice = " No checkpoint was complete yet: fix the cause and run again."
    return SaveError(f"could not write {where}: {reason}.{removed}{advice}", last)


@contextlib.contextmanager
def save_faults(trainer) -> Iterator[None]:
    """Turn a machine fault while `trainer` saves into SaveError (as_save_error, at its step then)."""
    try:
        yield
    except Exception as err:
        if (save_error := as_save_error(err, trainer.args.output_dir, trainer.state.global_step)) is None:
            raise
        raise save_error from err
