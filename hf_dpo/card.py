"""TEMPORARY shim over model_card.py until the card rewrite lands."""

from __future__ import annotations

from .model_card import write_model_card


def write_card(output_dir, inputs: dict, *, template_path=None):
    inputs = dict(inputs)
    inputs.pop("reference", None)
    inputs["datasets"] = inputs.get("datasets") or []
    return write_model_card(output_dir, **inputs, template_path=template_path)
