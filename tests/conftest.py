"""Shared test fixtures.

Every cache the tests touch (hf_dpo's, datasets', the Hub client's) lives in one temporary folder for the
session, set before any library reads its environment, so tests never write to ~/.cache and never reach
the network. Nothing from the user's shell leaks in: Hub variables (offline mode, token, endpoint, xet)
are removed here, and a test that needs one sets it itself (the fake Hub fixture does for its tests).
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
# The user's shell may hold any of these (HF_HUB_OFFLINE=1 on air-gapped clusters, a real token, a mirror).
for _name in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_XET",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "ACCELERATE_CONFIG_FILE",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
):
    os.environ.pop(_name, None)

import pytest  # noqa: E402
from hub_server import fake_hub  # noqa: E402, F401


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
