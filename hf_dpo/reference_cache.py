"""Precomputed reference log-probs: one no-grad pass before training, cached on disk under a key covering
everything the values depend on (base model, reference adapter weights, the tokenised data's fingerprint,
reduction, ld_alpha, ...). Under several processes each rank computes a disjoint shard; every rank gets all."""

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from .modeling import unwrap
from .tiny import default_cache_dir

logger = logging.getLogger(__name__)


def _weights_signature(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", ""))
    entries = sorted(Path(name).iterdir()) if os.path.isdir(name) else []
    weights = [e for e in entries if e.suffix in (".safetensors", ".bin")]
    files = [(e.name, e.stat().st_size, int(e.stat().st_mtime)) for e in weights]
    return {"name": name, "config": config.to_json_string() if config is not None else "", "files": files}


def reference_cache_key(trainer, dataset) -> str:
    reference = trainer.reference
    model = unwrap(reference.model if reference.kind == "model" else trainer.model)
    digest = hashlib.sha256()  # of a reference adapter's weights: they are not in the base model's files
    if reference.adapter:
        for name, param in sorted(model.named_parameters()):
            if f".{reference.adapter}." in name:
                digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    parts = {
        "version": 1,  # of this key and the stored format: a change makes every cached entry stale
        "data": dataset._fingerprint,
        "model": _weights_signature(model),  # a PeftModel passes its base model's .config through
        "reference": reference.kind,
        "reference_weights": digest.hexdigest() if reference.adapter else None,
        "reduction": trainer.args.logp_reduction,
        "ld_alpha": trainer.args.ld_alpha,  # LD-DPO weights the reference's tail tokens too
        # Shared and repeated prompts agree only to float rounding; a fresh adapter's rewards are exactly 0
        # only if the reference was computed along the same path as the policy.
        "share_prompt": bool(getattr(trainer.data_collator, "share_prompt", False)),
        "padding_free": trainer.args.padding_free,  # packed rows, likewise
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _compute_rows(trainer, dataset, indices: list[int]) -> list[list[float]]:
    batch_size = trainer.args.precompute_ref_batch_size or trainer.args.per_device_eval_batch_size
    loader = DataLoader(dataset.select(indices), batch_size=batch_size, collate_fn=trainer.data_collator)
    model = trainer.model
    was_training = model.training
    model.eval()
    values: list[list[float]] = []
    try:
        for batch in loader:
            batch = trainer._prepare_inputs(batch)
            batch.pop("ref_logps", None)
            ref = trainer.reference_logps(model, batch).float().cpu()
            values += [row[mask].tolist() for row, mask in zip(ref, batch["response_mask"].cpu())]
    finally:
        model.train(was_training)
    return values


def precompute_reference_logps(trainer, dataset):
    """Return `dataset` with a `ref_logps` column (list of K floats per row), from cache when possible."""
    path = default_cache_dir() / "ref_logps" / f"{reference_cache_key(trainer, dataset)}.safetensors"
    values = None
    if path.exists():
        stored = safetensors.torch.load_file(str(path))
        if stored["offsets"].numel() == len(dataset) + 1:
            values = [row.tolist() for row in stored["values"].split(stored["offsets"].diff().tolist())]
            logger.info("reference log-probs for %d rows loaded from cache %s", len(dataset), path)
    # Compute together unless every rank found the cache: a rank that computes alone would wait forever in the
    # gather below (e.g. the cache was written between two ranks' checks, or is not shared).
    if not all(gather_object([values is not None])):
        values = None
    if values is None:
        world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        mine = list(range(rank, len(dataset), world))  # each row once, over all ranks
        gathered = gather_object([(mine, _compute_rows(trainer, dataset, mine))])
        by_index = {index: row for indices, rows in gathered for index, row in zip(indices, rows)}
        values = [by_index[index] for index in range(len(dataset))]
        if trainer.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            flat = torch.tensor([v for row in values for v in row], dtype=torch.float32)
            offsets = torch.tensor([0, *map(len, values)]).cumsum(0)  # int64
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            safetensors.torch.save_file({"values": flat, "offsets": offsets}, str(tmp))
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
        message = "reference log-probs precomputed for %d rows, %d of them by rank %d (cache %s)"
        logger.info(message, len(dataset), len(mine), rank, path)
    return dataset.add_column("ref_logps", values)
