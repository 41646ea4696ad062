"""Files hf_dpo ships beside its code: the model card template, the bundled sample data, the recipe configs.

They live at the top of the source checkout (`model_card_template.md`, `data/`, `recipes/configs/`), where
people read and edit them; a wheel carries copies under `hf_dpo/_bundled/` (pyproject.toml, force-include).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def bundled_file(relative: str) -> Path:
    """The shipped file at `relative` (a path from the checkout's top, e.g. "data/dpo_data.jsonl")."""
    packaged = importlib.resources.files("hf_dpo").joinpath("_bundled", relative)
    if packaged.is_file() or packaged.is_dir():  # an installed wheel
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / relative  # a source checkout / editable install
    if checkout.exists():
        return checkout
    raise FileNotFoundError(f"{relative} is missing from this hf_dpo install; reinstall hf_dpo")
