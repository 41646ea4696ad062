"""Files hf_dpo ships: the model card template, the sample data, the recipe configs. They live at the
checkout's top, where people edit them; a wheel carries copies under `hf_dpo/_bundled/` (pyproject.toml)."""

import importlib.resources
from pathlib import Path


def bundled_file(relative: str) -> Path:
    """The shipped file at `relative` (a path from the checkout's top, e.g. "data/dpo_data.jsonl")."""
    packaged = Path(str(importlib.resources.files("hf_dpo").joinpath("_bundled", relative)))  # a wheel
    checkout = Path(__file__).resolve().parent.parent / relative  # a source checkout / editable install
    for path in (packaged, checkout):
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} is missing from this hf_dpo install; reinstall hf_dpo")
