"""Preference data: read any source (sources), normalise it to one schema (formats), tokenise it (tokenize).
Bad input raises one exception type, PreferenceDataError, naming the file, line or row, and field."""

from .formats import NORMALISED_FEATURES, RANKED_MODES, SplitStats, check_pairs_for_loss, load_preference_data  # noqa: F401
from .sources import SOURCE_FEATURES, PreferenceDataError, bundled_data_path, describe_rows  # noqa: F401
from .tokenize import TOKENIZED_FEATURES, tokenize_preference_dataset  # noqa: F401
