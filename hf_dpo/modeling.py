"""The model side: load a (4-bit) base with a LoRA adapter, prepare any model once for DPO, and choose the
reference policy the trainer compares against."""

import contextlib
import copy
import logging
import os
import warnings
import weakref
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass

import peft
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .attention import use_varlen_attention
from .config import ModelArguments
from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"  # the frozen copy of a trained adapter that the trainer adds

_PREPARED: weakref.WeakSet = weakref.WeakSet()  # models prepare_model has already seen
LoadedModel = namedtuple("LoadedModel", "model tokenizer")  # what load_model returns; model: a peft.PeftModel


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name)  # short names too
    if name not in (None, "auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, bfloat16, float16, float32")
    return default if name in (None, "auto") else getattr(torch, name)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str = "main"):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), trust_remote_code=trust_remote_code, revision=revision
    )
    if tokenizer.pad_token_id is None:  # padding is masked out everywhere: EOS is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_args: ModelArguments,
    *,
    peft_config=None,
    use_cpu: bool = False,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
) -> LoadedModel:
    """Load the base model (4-bit, 8-bit or full precision) with a LoRA adapter to train: a new one (`peft_config`,
    else the `lora_*` fields), or `adapter_name_or_path` to continue (a frozen copy is then the reference)."""
    on_gpu = not use_cpu and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    default_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    compute_dtype = _dtype(model_args.bnb_4bit_compute_dtype, default_dtype)
    quantization_config = None
    if model_args.load_in_8bit:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    elif model_args.load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            # Stored in the compute dtype so FSDP can shard the 4-bit weights like any other tensor.
            bnb_4bit_quant_storage=compute_dtype if on_gpu else torch.uint8,
        )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        quantization_config=quantization_config,
        dtype=_dtype(model_args.torch_dtype, compute_dtype),
        # ZeRO-3 partitions the weights itself: a device_map would place whole copies on every rank.
        device_map=None if is_deepspeed_zero3_enabled() else {"": device},
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,  # None: the model's default
    )
    model.config.use_cache = False
    adapter_path = model_args.adapter_name_or_path
    if adapter_path and peft_config is not None:
        raise ValueError("give adapter_name_or_path (an adapter to continue) or peft_config, not both")
    if not adapter_path and peft_config is None:
        peft_config = peft.LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
    checkpointing = (gradient_checkpointing, gradient_checkpointing_kwargs)
    model = attach_adapter(model, peft_config, *checkpointing, adapter_path=adapter_path)
    guard_cpu_4bit_repacking(model)
    tokenizer_name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, model_args.trust_remote_code, model_args.model_revision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantization = describe_quantization(model)
    message = "hf_dpo model: %s on %s, quantization %s, LoRA trainable %d params"
    logger.info(message, model_args.model_name_or_path, device, quantization, trainable)
    return LoadedModel(model, tokenizer)


def attach_adapter(
    model: nn.Module, peft_config, gradient_checkpointing=False, checkpointing_kwargs=None, adapter_path=None
):
    """`model` (a causal LM, k-bit prepared here) with a trainable LoRA adapter: new, or `adapter_path`'s."""
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "the model is already a PeftModel, so peft_config would be ignored: pass the base model with "
            "peft_config, or the PeftModel without it"
        )
    kwargs = checkpointing_kwargs or {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        peft.prepare_model_for_kbit_training(model, gradient_checkpointing, kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(kwargs)
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft (0.21) reads `is_gradient_checkpointing`, deprecated, on every run
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        if adapter_path:
            return peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        return peft.get_peft_model(model, peft_config)


def prepare_model(model: nn.Module, args, *, is_reference: bool = False) -> nn.Module:
    """Make a model ready for DPO: per trainer, per-sequence attention for padding-free batches; once per model,
    the 4-bit repacking guard and (`disable_dropout`) every dropout zeroed so policy and reference passes agree,
    but the trained adapter's `lora_dropout` (the reference never runs that adapter)."""
    if args.padding_free:
        # sdpa/eager would attend across the whole packed row (N^2); attend within each sequence instead.
        use_varlen_attention(model)
    if model in _PREPARED:
        return model
    if args.disable_dropout:
        active = None if is_reference else getattr(unwrap(model), "active_adapter", None)
        lora_dropouts = [getattr(module, "lora_dropout", None) for module in model.modules()]
        trained = {d[active] for d in lora_dropouts if isinstance(d, nn.ModuleDict) and active in d}
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module not in trained:
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
    guard_cpu_4bit_repacking(model)
    _PREPARED.add(model)
    return model


def describe_quantization(model: nn.Module) -> str:
    base = unwrap(model)  # a PeftModel passes .config and .dtype through from its base model
    config = getattr(base.config, "quantization_config", None)
    if getattr(config, "load_in_8bit", False):
        return "8-bit (bitsandbytes LLM.int8)"
    if not getattr(config, "load_in_4bit", False):
        return f"none ({str(base.dtype).removeprefix('torch.')})"
    nested = " nested" if config.bnb_4bit_use_double_quant else ""
    compute = str(config.bnb_4bit_compute_dtype).removeprefix("torch.")
    return f"4-bit {config.bnb_4bit_quant_type}{nested} (compute {compute})"


def guard_cpu_4bit_repacking(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference, and undo repacking already done: on CPUs with
    AVX512-BF16 an eval-mode no_grad pass packs a Linear4bit's weight, after which LoRA gradients through it are
    silently wrong, so evaluation and reference passes would change training."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

                weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
                module.quant_state = weight.quant_state


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP/DeepSpeed wrappers (anything with a `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@dataclass
class Reference:
    kind: str  # where reference log-probs come from: adapter, disabled (adapters off), model or none
    description: str
    adapter: str | None = None  # for "adapter": the name of a frozen adapter of the same model
    model: nn.Module | None = None  # for "model": a separate model (or the model itself, precomputed)


def is_fresh_adapter(peft_model: nn.Module) -> bool:
    """True if the active LoRA adapter adds nothing yet (its B matrices are zero), so disabling it is a no-op."""
    active, kinds = peft_model.active_adapter, ("lora_B", "lora_embedding_B")
    lora_b = [p for n, p in peft_model.named_parameters() if any(k in n for k in kinds) and f".{active}" in n]
    return bool(lora_b) and not any(p.detach().ne(0).any() for p in lora_b)


def choose_reference(model: nn.Module, args, ref_model: nn.Module | None = None) -> Reference:
    """The reference policy for `model`, as a TRL user expects it: the first rule below that applies (so a fresh
    LoRA adapter's is the model with adapters off; a trained one's, e.g. after SFT, a frozen copy of it)."""
    if args.reference_free:
        return Reference("none", "none (reference-free)")
    if ref_model is not None:
        return Reference("model", "a separate reference model", model=ref_model)
    peft_model = unwrap(model)
    adapters = getattr(peft_model, "peft_config", {})
    if name := args.ref_adapter_name:
        if name not in adapters:
            raise ValueError(
                f"ref_adapter_name={name!r} is not an adapter of the model (it has "
                f"{sorted(adapters) or 'none'}); load it first with model.load_adapter(path, adapter_name=...)"
            )
        peft_model.set_requires_grad(name, requires_grad=False)
        return Reference("adapter", f"adapter {name!r} (ref_adapter_name)", name)
    if not adapters:
        if args.precompute_ref_log_probs:
            return Reference("model", "the model before training (precomputed)", model=model)
        logger.info("no LoRA adapter and no ref_model: a frozen copy of the model is the reference policy")
        frozen = copy.deepcopy(model).requires_grad_(False)
        return Reference("model", "a frozen copy of the model", model=frozen)
    if REFERENCE_ADAPTER not in adapters:  # else an earlier trainer already added the frozen copy
        if not any(p.requires_grad for p in peft_model.parameters()) or is_fresh_adapter(peft_model):
            return Reference("disabled", "the base model with the LoRA adapter disabled")
        active = peft_model.active_adapter
        config = copy.deepcopy(adapters[active])
        config.lora_dropout = 0.0  # the reference pass must be deterministic
        peft_model.add_adapter(REFERENCE_ADAPTER, config)
        weights = peft.get_peft_model_state_dict(peft_model, adapter_name=active)
        peft.set_peft_model_state_dict(peft_model, weights, adapter_name=REFERENCE_ADAPTER)
        peft_model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)
        logger.info(
            "the model's adapter %r is already trained: a frozen copy of it is the reference policy, so the "
            "run starts at loss ln 2 (pass ref_model=... or ref_adapter_name=... to choose another)",
            active,
        )
    return Reference("adapter", "a frozen copy of the loaded adapter", REFERENCE_ADAPTER)


@contextlib.contextmanager
def reference_policy(model: nn.Module, reference: Reference) -> Iterator[nn.Module]:
    """Yield the module to run for reference log-probs (use under torch.no_grad())."""
    peft_model = unwrap(model)
    if reference.kind == "model":
        yield reference.model
    elif reference.kind == "adapter":
        active = peft_model.active_adapter
        peft_model.base_model.set_adapter(reference.adapter, inference_mode=True)
        try:
            yield model
        finally:
            peft_model.base_model.set_adapter(active)
    elif reference.kind == "disabled":
        with peft_model.disable_adapter():
            yield model
    else:
        raise ValueError(f"no reference policy of kind {reference.kind!r}")
