"""TEMPORARY shim over model_card.py until the card rewrite lands."""

from .model_card import plot_training_curves  # noqa: F401
