"""hf_dpo: Direct Preference Optimization with QLoRA for the Hugging Face ecosystem."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `hf-dpo --version` does not load torch.
_EXPORTS = {
    "DPOConfig": "config",
    "ModelArguments": "config",
    "DataArguments": "config",
    "DPOTrainer": "trainer",
    "NonFiniteLossError": "callbacks",
    "SaveError": "callbacks",
    "HubPushError": "hub",
    "load_preference_data": "data",
    "tokenize_preference_dataset": "data",
    "PreferenceDataError": "data",
    "PreferenceCollator": "collator",
    "load_model": "modeling",
    "prepare_model": "modeling",
    "sequence_logps": "logps",
    "sequence_logps_from_hidden": "logps",
    "preference_loss": "losses",
    "LossSpec": "losses",
    "LOSSES": "losses",
    "LOSS_TYPES": "losses",
    "validate_loss_options": "losses",
    "needs_reference": "losses",
    "sigmoid_loss": "losses",
    "ipo_loss": "losses",
    "hinge_loss": "losses",
    "robust_loss": "losses",
    "simpo_loss": "losses",
    "sft_loss": "losses",
    "plackett_luce_loss": "losses",
    "ensure_tiny_model": "tiny",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'hf_dpo' has no attribute {name!r}")
