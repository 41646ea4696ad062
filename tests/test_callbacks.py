"""hf_dpo.callbacks on a real tiny 4-bit run: faults of the machine while saving get the same care as faults of
the data (one message naming the folder, the error, the last complete checkpoint; the half-written checkpoint
removed), and the checkpoint-complete marker decides what can be resumed."""

from __future__ import annotations

import errno
import math

import pytest
import torch
from trainer_helpers import dpo_config, load, lora_state, tokenised_rows

from hf_dpo.callbacks import CHECKPOINT_COMPLETE, SaveError, as_save_error, last_complete_checkpoint
from hf_dpo.trainer import DPOTrainer


def _trainer(path, out, **config):
    loaded = load(path)
    args = dpo_config(out, **{"max_steps": 6, "save_strategy": "steps", "save_steps": 2, **config})
    return DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=tokenised_rows(loaded.tokenizer),
        processing_class=loaded.tokenizer,
    )


@pytest.mark.parametrize(
    "where",
    ["tokenizer", "optimizer"],
)
def test_a_full_disk_while_saving_names_folder_error_and_last_checkpoint(
    tiny_model_path, tmp_path, monkeypatch, where
):
    """The tokenizers library reports a full disk as a plain Exception "... (os error 28)"; torch.save as an
    OSError. Either way: SaveError, checkpoint-4 (half-written) removed, checkpoint-2 complete, resume works."""
    out = tmp_path / "run"
    trainer = _trainer(tiny_model_path, out)
    if where == "tokenizer":
        original = trainer.processing_class.save_pretrained

        def save_pretrained(folder, *args, **kwargs):
            if str(folder).endswith("checkpoint-4"):
                raise Exception("No space left on device (os error 28)")  # as tokenizers raises it
            return original(folder, *args, **kwargs)

        monkeypatch.setattr(trainer.processing_class, "save_pretrained", save_pretrained)
    else:
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if "checkpoint-4" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return original_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SaveError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "No space left on device" in message and "checkpoint-4" in message
    assert "The half-written checkpoint-4 was removed" in message
    assert f"The last complete checkpoint is {out / 'checkpoint-2'}" in message
    assert caught.value.last_checkpoint == str(out / "checkpoint-2")
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file()

    monkeypatch.undo()
    resumed = _trainer(tiny_model_path, out)
    resumed.train(resume_from_checkpoint=True)
    straight = _trainer(tiny_model_path, tmp_path / "straight", save_strategy="no")
    straight.train()
    a, b = lora_state(straight.model), lora_state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_final_save_is_a_save_error_too(tiny_model_path, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_path, tmp_path / "run", save_strategy="no")
    trainer.train()
    target = tmp_path / "final"

    def save_pretrained(folder, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr(trainer.processing_class, "save_pretrained", save_pretrained)
    with pytest.raises(
        SaveError, match=r"could not write .*final: Permission denied \[errno 13\]\. No checkpoint"
    ):
        trainer.save_model(str(target))


def test_other_errors_are_not_save_errors(tmp_path):
    assert as_save_error(ValueError("bad value"), str(tmp_path), 3) is None
    assert as_save_error(RuntimeError("CUDA out of memory"), str(tmp_path), 3) is None
    (tmp_path / "checkpoint-3").mkdir()
    error = as_save_error(OSError(errno.EDQUOT, "Disk quota exceeded"), str(tmp_path), 3)
    assert "Disk quota exceeded [errno 122]" in str(error) and not (tmp_path / "checkpoint-3").exists()


def test_only_marked_checkpoints_count(tmp_path):
    for step, marked in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if marked:
            (folder / CHECKPOINT_COMPLETE).write_text("complete\n")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None


def test_the_guard_stops_on_non_finite_weights_before_they_are_saved(tiny_model_path, tmp_path):
    """learning_rate inf: finite loss and gradients, but the update overflows; nothing non-finite is saved."""
    trainer = _trainer(tiny_model_path, tmp_path / "run", learning_rate=math.inf, save_steps=1)
    from hf_dpo.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite (weights|gradient|loss)"):
        trainer.train()
    assert last_complete_checkpoint(str(tmp_path / "run")) is None
