"""Files hf_dpo ships: the model card template, the sample data, the recipe configs. They live at the
checkout's top, where people edit them; a wheel carries copies under `hf_dpo/_bundled/` (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path


def bundled_file(relative: str) -> Path:
    """The shipped file at `relative` (a path from the checkout's top, e.g. "data/dpo_data.jsonl")."""
    here = Path(__file__)
    # In a wheel, the copy under _bundled/; in a source checkout or editable install, the file itself.
    for path in (here.parent / "_bundled" / relative, here.resolve().parent.parent / relative):
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} is missing from this hf_dpo install; reinstall hf_dpo")
