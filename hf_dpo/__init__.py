"""hf_dpo: Direct Preference Optimization with QLoRA for the Hugging Face ecosystem."""

import importlib

__version__ = "0.1.0"

# Public names by module, imported on first use so that `hf-dpo --version` does not load torch.
_MODULES = {
    "config": "DPOConfig ModelArguments DataArguments",
    "trainer": "DPOTrainer",
    "callbacks": "NonFiniteLossError SaveError",
    "hub": "HubPushError",
    "data": "load_preference_data tokenize_preference_dataset PreferenceDataError",
    "collator": "PreferenceCollator",
    "modeling": "load_model prepare_model",
    "logps": "sequence_logps sequence_logps_from_hidden",
    "losses": "preference_loss LossSpec LOSSES LOSS_TYPES validate_loss_options needs_reference sigmoid_loss "
    "ipo_loss hinge_loss robust_loss simpo_loss sft_loss plackett_luce_loss",
    "tiny": "ensure_tiny_model",
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names.split()}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_dpo' has no attribute {name!r}")
