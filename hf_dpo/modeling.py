"""Load the base model (4-bit, 8-bit or full precision), attach or continue a LoRA adapter, and give the
trainer the reference policy as a context on the same model."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .config import ModelArguments
from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"


@dataclass
class LoadedModel:
    model: nn.Module  # a peft.PeftModel
    tokenizer: object
    base_model_name: str  # what the user asked for (a Hub id or path), for the model card
    quantization: str  # e.g. "4-bit nf4 (compute float32)"
    has_reference_adapter: bool


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name in (None, "auto"):
        return default
    dtypes = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, bfloat16, float16, float32")
    return dtypes[name]


def pick_device(use_cpu: bool = False) -> torch.device:
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str = "main"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), trust_remote_code=trust_remote_code, revision=revision
    )
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_args: ModelArguments,
    *,
    use_cpu: bool = False,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
    adapter_is_reference: bool = True,
) -> LoadedModel:
    """Load the base model, prepare it for k-bit training and attach (or continue) a LoRA adapter.

    With `adapter_name_or_path`, the loaded adapter is trained further and (if `adapter_is_reference`) a frozen
    copy of it is the reference; otherwise the reference is the base model with the adapter disabled.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_args.model_name_or_path)
    device = pick_device(use_cpu)
    on_gpu = device.type == "cuda"
    default_compute = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    compute_dtype = _dtype(model_args.bnb_4bit_compute_dtype, default_compute)
    weights_dtype = _dtype(model_args.torch_dtype, compute_dtype)

    quantization_config = None
    if model_args.load_in_8bit:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
        quantization = "8-bit (bitsandbytes LLM.int8)"
    elif model_args.load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            # Stored in the compute dtype so FSDP can shard the 4-bit weights like any other tensor.
            bnb_4bit_quant_storage=compute_dtype if on_gpu else torch.uint8,
        )
        quantization = (
            f"4-bit {model_args.bnb_4bit_quant_type}{' nested' if model_args.use_bnb_nested_quant else ''} "
            f"(compute {str(compute_dtype).removeprefix('torch.')})"
        )
    else:
        quantization = f"none ({str(weights_dtype).removeprefix('torch.')})"

    kwargs = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        quantization_config=quantization_config,
        dtype=weights_dtype,
        # ZeRO-3 partitions the weights itself: a device_map would place whole copies on every rank.
        device_map=None if is_deepspeed_zero3_enabled() else {"": device},
        trust_remote_code=model_args.trust_remote_code,
        use_safetensors=None,
        **kwargs,
    )
    model.config.use_cache = False
    if quantization_config is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs or {"use_reentrant": False})
        model.enable_input_require_grads()

    has_reference_adapter = False
    if model_args.adapter_name_or_path:
        # Continue training the given adapter; a second, frozen copy of it is the reference policy.
        model = PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
        if adapter_is_reference:
            model.load_adapter(
                model_args.adapter_name_or_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False
            )
            has_reference_adapter = True
    else:
        lora_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    guard_cpu_4bit_repacking(model)

    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        revision=model_args.model_revision,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "hf_dpo model: %s on %s, quantization %s, LoRA trainable %d of %d params, reference: %s",
        model_args.model_name_or_path,
        device,
        quantization,
        trainable,
        total,
        "frozen copy of the loaded adapter"
        if has_reference_adapter
        else "base model with the adapter disabled",
    )
    return LoadedModel(model, tokenizer, model_args.model_name_or_path, quantization, has_reference_adapter)


def guard_cpu_4bit_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; undo any repacking already done.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode under no_grad converts its weight to a packed
    layout, after which LoRA gradients through that layer are silently wrong. Evaluation and reference passes
    must not change later training, so the fast inference path is turned off. Returns the layers touched.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    touched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state
                )
                module.quant_state = weight.quant_state
            touched += 1
    return touched


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout (modules and attention-probability dropout), so policy and reference agree."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP/DeepSpeed wrappers (anything with a `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """The reference policy on the same weights: the frozen reference adapter if one was loaded, else the
    base model with every adapter disabled. Use under torch.no_grad()."""
    peft_model = unwrap(model)
    if REFERENCE_ADAPTER in getattr(peft_model, "peft_config", {}):
        active = peft_model.active_adapter
        peft_model.base_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            peft_model.base_model.set_adapter(active)
    elif hasattr(peft_model, "disable_adapter"):
        with peft_model.disable_adapter():
            yield
    else:
        raise ValueError(
            "the model has no LoRA adapter to disable: pass a ref_model or precompute reference log-probs"
        )


# Model configs whose logits are post-processed after the LM head: the fused head would skip that.
_LOGIT_POSTPROCESSING_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def fusable_lm_head(model: nn.Module) -> nn.Linear | None:
    """The plain Linear LM head whose input the trainer may take instead of the logits, or None.

    The trainer applies the head's weight itself, after the model's forward. That is only right when the weight
    is a whole, local tensor outside the forward: never under DeepSpeed ZeRO-3 (a weight exists only inside its
    module's forward) or FSDP (a shard, a DTensor or a view into a flat parameter, depending on the version and on
    whether the root resharded after forward), so the real logits are used there.
    """
    if is_deepspeed_zero3_enabled() or _is_sharded(model):
        return None
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is not None and any(
        getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING_ATTRS
    ):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:  # a LoRA-wrapped, quantised or FSDP2-wrapped head: use real logits
        return None
    if _is_sharded_tensor(head.weight) or (head.bias is not None and _is_sharded_tensor(head.bias)):
        return None
    return head


@functools.cache
def _fsdp_module_types() -> tuple[type, ...]:
    """FSDP1's wrapper class and FSDP2's `fully_shard` marker class, where this torch build has them."""
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # a torch build without distributed support
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it under _composable
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            FSDPModule = None
    if FSDPModule is not None:
        types.append(FSDPModule)
    return tuple(types)


def _is_sharded(model: nn.Module) -> bool:
    """True if FSDP (a FullyShardedDataParallel wrapper, or `fully_shard`) manages `model` or a module between it
    and its LM head: the wrappers, the peft model and its base model (the head's parent). FSDP on modules that do
    not hold the head (e.g. only the decoder layers) leaves the head's weight a plain tensor. A few isinstance
    checks: this runs at every forward."""
    types = _fsdp_module_types()
    if not types:
        return False
    chain = [model]
    while isinstance(getattr(chain[-1], "module", None), nn.Module):
        chain.append(chain[-1].module)
    inner = chain[-1]
    if hasattr(inner, "get_base_model"):  # a peft model: PeftModel -> LoraModel -> the causal LM
        chain += [inner.base_model, inner.get_base_model()]
    return any(isinstance(module, types) for module in chain)


def _is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel), an FSDP1 flat parameter, or a DeepSpeed ZeRO-3 partitioned one."""
    if hasattr(tensor, "ds_id") or type(tensor).__name__ == "FlatParameter":
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5, or no distributed support
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def lm_head_returns_hidden_states(head: nn.Linear) -> Iterator[None]:
    """Make the LM head the identity for one forward, so the model's `logits` are its final hidden states.

    The forward still goes through the (possibly DDP-wrapped) model, so hooks and gradient sync are intact;
    the trainer then applies the head itself, chunked, to the completion positions only.
    """
    head.forward = lambda hidden_states: hidden_states  # instance attribute shadows the class method
    try:
        yield
    finally:
        del head.forward
