"""Tokenising normalised rows (DESIGN.md, "Tokenisation contract") in one batched `Dataset.map`, cached by
`datasets` under a fingerprint of the input rows, the tokenizer and the settings."""

from __future__ import annotations

import json
import logging

import datasets
import pyarrow.compute as pc

from .formats import SplitStats, Where, drop_marked
from .sources import SOURCE_FEATURES, PreferenceDataError, cache_key

logger = logging.getLogger(__name__)

_IDS = datasets.List(datasets.Value("int32"))
TOKENIZED_FEATURES = datasets.Features(
    {"prompt_input_ids": _IDS, "completion_input_ids": [_IDS], "source_line": datasets.Value("int64")}
)
_STATUS = datasets.Features({"_truncated": datasets.Value("bool"), "_drop": datasets.Value("string")})
TOKENIZE_VERSION = "2"  # part of the cache key: bump it when tokenised rows change
DROP_EMPTY_AFTER_TRUNCATION = "completion empty after truncation"
DROP_EMPTY_PROMPT = "prompt has no tokens"
DROP_NO_COMPLETIONS = "no completions"


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    probe = tokenizer("hf_dpo probe: Hello, world!\n").input_ids  # catches Python-side special-token logic
    specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_token_id, tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    return cache_key(type(tokenizer).__qualname__, core, template, specials, probe)


def _encoder(tokenizer):
    """(texts, add_special_tokens) -> the input_ids `tokenizer(texts)` gives. For a plain fast tokenizer,
    whose `__call__` only runs the Rust tokenizer, it calls that directly: a quarter faster, since no
    attention masks or BatchEncoding are built."""
    from transformers import PreTrainedTokenizerFast

    rust = getattr(tokenizer, "backend_tokenizer", None)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and type(tokenizer)._encode_plus is PreTrainedTokenizerFast._encode_plus  # no subclass logic
        and rust.truncation is None
        and rust.padding is None
        and rust.encode_special_tokens == bool(tokenizer.split_special_tokens)
    ):
        return lambda texts, special: [e.ids for e in rust.encode_batch(texts, add_special_tokens=special)]
    return lambda texts, special: tokenizer(texts, add_special_tokens=special)["input_ids"]


def _render_conversation(messages_json: str, tokenizer, where: Where) -> tuple[str, list[str], bool]:
    """Chat-template texts: (prompt, completions, add_special_tokens) for a conversational row."""
    data, texts = json.loads(messages_json), []
    for key in ("prompt", "chosen", "rejected"):
        messages = data["prompt"] + (data[key] if key != "prompt" else [])
        try:
            rendered = tokenizer.apply_chat_template(
                messages, add_generation_prompt=key == "prompt", tokenize=False
            )
        except Exception as e:  # no chat template, or a template that rejects the messages
            raise where.error(key, f"cannot render with the chat template: {type(e).__name__}: {e}") from e
        texts.append(rendered)
    prompt, completions = texts[0], []
    for key, full in zip(("chosen", "rejected"), texts[1:]):
        if not full.startswith(prompt):
            reason = "the rendered conversation does not start with the rendered prompt (chat template"
            raise where.error(
                key, f"{reason} with add_generation_prompt=True is not a prefix of the full one)"
            )
        text = full[len(prompt) :]
        eos = tokenizer.eos_token  # the template's newline after EOS is not part of the answer
        completions.append(text.rstrip() if eos and text.rstrip().endswith(eos) else text)
    return prompt, completions, not (tokenizer.bos_token and tokenizer.bos_token in prompt)


def _truncate(prompt: list[int], completions: list[list[int]], max_length, max_prompt_length):
    """(prompt, completions, truncated) under the length rule of `tokenize_preference_dataset`."""
    longest = max(map(len, completions))
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = max_prompt_length
    if keep is None:  # cut the prompt only as far as the completions need, but not below half the budget
        keep = max(max_length - longest, min(len(prompt), max_length // 2))
    prompt = prompt[max(len(prompt) - keep, 0) :]  # from the left, as in TRL: a leading BOS goes with the cut
    return prompt, [c[: max(max_length - len(prompt), 0)] for c in completions], True


def _tokenize_batch(batch: dict, tokenizer, max_length, max_prompt_length, split_name: str) -> dict:
    n, encode, eos = len(batch["prompt"]), _encoder(tokenizer), tokenizer.eos_token_id
    names = batch.get("source_name") or [f"<{split_name} dataset>"] * n
    kinds = batch.get("source_kind") or ["source_line"] * n
    texts, rows = {True: [], False: []}, []  # by add_special_tokens: [prompt, prompt + completion, ...]
    for i, messages in enumerate(batch.get("messages_json") or [""] * n):
        if messages:
            where = Where(names[i], kinds[i], batch["source_line"][i])
            prompt, completions, special = _render_conversation(messages, tokenizer, where)
        else:
            prompt, completions, special = batch["prompt"][i], batch["completions"][i], True
        # prompt_ids = tok(prompt); full_ids = tok(prompt + completion); completion = full minus prompt
        rows.append((special, len(texts[special]), completions))
        texts[special] += [prompt] + [prompt + c for c in completions]
    encoded = {special: encode(texts[special], special) if texts[special] else [] for special in texts}
    out: dict[str, list] = {key: [] for key in ("prompt_input_ids", "completion_input_ids", *_STATUS)}
    for special, start, texts_of_row in rows:
        prompt, fulls = encoded[special][start], encoded[special][start + 1 : start + 1 + len(texts_of_row)]
        # BPE may merge across the boundary (the full ids then do not start with the prompt's): encode the
        # completion on its own.
        merged = [text for text, full in zip(texts_of_row, fulls) if full[: len(prompt)] != prompt]
        alone = iter(encode(merged, False) if merged else [])
        completions = [
            full[len(prompt) :] if full[: len(prompt)] == prompt else next(alone) for full in fulls
        ]
        completions = [c if eos is None or c[-1:] == [eos] else c + [eos] for c in completions]
        truncated, reason = False, DROP_NO_COMPLETIONS
        if completions:
            prompt, completions, truncated = _truncate(prompt, completions, max_length, max_prompt_length)
            reason = (
                DROP_EMPTY_PROMPT if not prompt else "" if all(completions) else DROP_EMPTY_AFTER_TRUNCATION
            )
        for key, value in zip(out, (prompt, completions, truncated, reason)):
            out[key].append(value)
    return out


def tokenize_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    split_name: str = "train",
    return_stats: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SplitStats]:
    """Tokenise normalised rows into prompt_input_ids, completion_input_ids (K lists, best first) and the
    source columns, following DESIGN.md's tokenisation contract (EOS ends every completion once).

    Length rule, for a row whose prompt (P tokens) plus longest completion (C tokens, with EOS) is over
    `max_length` (L); rows that fit are never changed. The prompt keeps its last
      - min(P, M) tokens with `max_prompt_length` M;
      - max(L - C, min(P, L // 2)) tokens with `max_prompt_length=None`: it is cut only as far as the
        completions need, and not below half of L (while it is longer than that);
    then every completion keeps its first L - (prompt tokens kept) tokens. With None a completion keeps at
    least L - L // 2 tokens and no row is emptied; with M >= L a row can be, and rows left with an empty
    completion are dropped and counted. Cached by `datasets`: the same rows, tokenizer and settings are
    tokenised once. With `return_stats`, also returns a SplitStats.
    """
    missing = sorted({"prompt", "completions", "source_line"} - set(dataset.column_names))
    if missing:
        reason = f"not a normalised preference dataset: missing columns {missing} (use load_preference_data)"
        raise PreferenceDataError(reason, f"<{split_name} dataset>", field=missing[0])
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PreferenceDataError(f"{name} must be a positive int or None, got {value!r}", field=name)
    if max_prompt_length is not None and max_length is None:
        reason = "has no effect without max_length: set both, or neither"
        raise PreferenceDataError(reason, field="max_prompt_length")
    carried = [c for c in SOURCE_FEATURES if c in dataset.column_names]
    features = datasets.Features({**TOKENIZED_FEATURES, **{c: SOURCE_FEATURES[c] for c in carried}})
    if len(dataset) == 0:
        empty = datasets.Dataset.from_dict({key: [] for key in features}, features=features)
        return (empty, SplitStats(split_name)) if return_stats else empty
    settings = [max_length, max_prompt_length, split_name]
    fingerprint = cache_key(
        "tokenize", TOKENIZE_VERSION, dataset._fingerprint, _tokenizer_identity(tokenizer), settings
    )
    mapped = dataset.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc,
        remove_columns=[c for c in dataset.column_names if c not in carried],
        fn_kwargs=dict(
            zip(("tokenizer", "max_length", "max_prompt_length", "split_name"), (tokenizer, *settings))
        ),
        features=datasets.Features({**features, **_STATUS}),
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {split_name}",
    )
    truncated = pc.sum(mapped.with_format("arrow")["_truncated"]).as_py() or 0
    mapped, reasons = drop_marked(mapped.remove_columns("_truncated"), num_proc)
    stats = SplitStats(split_name, len(dataset), len(mapped), len(mapped), truncated, reasons)
    (logger.warning if reasons else logger.info)(stats.summary("tokenized"))
    return (mapped, stats) if return_stats else mapped
