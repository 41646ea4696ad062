"""A tiny causal LM and tokenizer built locally (nothing downloaded), for smoke tests and the default run: a
byte-level BPE trained on a fixed corpus and a 2-layer Llama from a fixed seed, so every machine builds the same
files. It exercises the whole pipeline in seconds and is not useful for anything else."""

import json
import os
from pathlib import Path

TINY_MODEL_NAME = "hf_dpo/tiny-llama"  # the model_name_or_path of the tiny model (the recipe's default)
TINY_BUILD_VERSION = "1"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Explain why the sky is blue. Sunlight is scattered by molecules in the air, and blue light is
scattered more than red light because it has a shorter wavelength.
Write a short poem about the sea. The sea is wide, the sea is deep, it sings the shore to sleep.
I am not sure. I cannot help with that. Maybe ask someone else. That is not something I know.
Sort the numbers 3, 1, 2. The sorted list is 1, 2, 3. Add 12 and 30: the sum is 42.
Translate hello into Spanish: hola. Translate thank you into French: merci.
Give me a tip for learning to code. Practice a little every day and read other people's code.
user assistant system Human Assistant prompt chosen rejected response helpful correct wrong
def add(a, b): return a + b   for i in range(10): print(i)   {"key": [1, 2, 3]}
"""


def tiny_corpus() -> list[str]:
    """The fixed texts the tiny tokenizer is trained on."""
    return [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]


def build_tiny_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE with BOS/EOS/PAD and a chat template; returns a transformers tokenizer that adds
    BOS at the start of every encoded text (like Llama's), never EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, alphabet = ["<pad>", "<s>", "</s>", "<unk>"], pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **special_tokens_map)


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A randomly initialised Llama causal LM (2 layers, 64 wide by default), deterministic in `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    # A private generator state: building the model must not move the caller's RNG (the training seed).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def default_cache_dir() -> Path:
    xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(os.environ.get("HF_DPO_CACHE") or os.path.join(xdg_cache, "hf_dpo"))


def ensure_tiny_model(path: str | os.PathLike | None = None) -> Path:
    """Build (once) the tiny model and tokenizer into `path` and return it; a later call reuses the files."""
    target = Path(path) if path is not None else default_cache_dir() / f"tiny-llama-v{TINY_BUILD_VERSION}"
    marker = target / "hf_dpo_tiny.json"
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    build_tiny_model(vocab_size=len(tokenizer)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "hf_dpo_tiny.json").write_text(json.dumps({"version": TINY_BUILD_VERSION}))
    # Move the files in last, the marker after everything else, so a crash (or another process looking at the
    # same moment) never finds a half-built model that it would trust.
    for item in sorted(tmp.iterdir(), key=lambda item: item.name == marker.name):
        os.replace(item, target / item.name)
    tmp.rmdir()
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the tiny model's name to its locally built folder; any other name is returned unchanged."""
    if name_or_path in (TINY_MODEL_NAME, "tiny"):
        return str(ensure_tiny_model())
    return name_or_path
