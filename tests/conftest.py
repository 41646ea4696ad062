"""Shared test fixtures.

Every cache the tests touch (hf_dpo's, datasets', the Hub client's) lives in one temporary folder for the
session, set before any library reads its environment, so tests never write to ~/.cache and never reach
the network.
"""

from __future__ import annotations

import os
import tempfile

_SESSION_CACHE = tempfile.mkdtemp(prefix="hf_dpo_tests_")
os.environ["HF_DPO_CACHE"] = os.path.join(_SESSION_CACHE, "hf_dpo")
os.environ["HF_HOME"] = os.path.join(_SESSION_CACHE, "hf_home")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_SESSION_CACHE, "datasets")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The tiny Llama + tokenizer of `hf_dpo.tiny`, saved once per session."""
    from hf_dpo.tiny import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The real byte-level BPE tokenizer of `hf_dpo.tiny` (BOS id 1, EOS id 2, pad id 0), built once.

    Shared by the whole session: do not mutate it; `copy.deepcopy` it to change settings.
    """
    from hf_dpo.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()
