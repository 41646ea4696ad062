"""Preference data: read any supported source (sources), normalise it to one schema (formats), tokenise it
(tokenize). Bad input raises one exception type, PreferenceDataError, naming the file, line or row, and field.
"""

from .formats import NORMALISED_FEATURES, RANKED_MODES, SplitStats, check_pairs_for_loss, load_preference_data
from .sources import SOURCE_FEATURES, PreferenceDataError, bundled_data_path, describe_rows
from .tokenize import TOKENIZED_FEATURES, tokenize_preference_dataset

__all__ = [
    "NORMALISED_FEATURES",
    "RANKED_MODES",
    "SOURCE_FEATURES",
    "TOKENIZED_FEATURES",
    "PreferenceDataError",
    "SplitStats",
    "bundled_data_path",
    "check_pairs_for_loss",
    "describe_rows",
    "load_preference_data",
    "tokenize_preference_dataset",
]
