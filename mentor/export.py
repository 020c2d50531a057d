"""Hugging Face export: a folder that ``AutoModelForCausalLM.from_pretrained`` and vLLM load directly
(safetensors weights, ``config.json`` with the architecture and the weights' dtype, the tokenizer files,
``generation_config.json``).

Two ways in:

- from the live FSDP2 model, during training: :func:`export_hf` (collective: every rank gathers the full
  weights through the public ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, rank 0 writes);
- offline, from a mentor checkpoint (``mentor.utils.checkpoint`` layout), without a process group::

      python -m mentor.export <ckpt_dir> <out_dir> [--base-model PATH] [--dtype auto|float32|bfloat16|float16]
                              [--overwrite]

  reads the model entries of the DCP shards (``actor/``) into plain tensors (``dcp.load`` with ``no_dist``) and
  writes them with the config, tokenizer and generation config saved in the checkpoint (``huggingface/``);
  ``--base-model`` overrides those, and is needed only for checkpoints that lack them. ``<ckpt_dir>`` may also be
  a save directory: its latest complete checkpoint is exported. ``--dtype auto`` writes the base model's dtype
  (recorded in ``meta.json``; training keeps fp32 master weights, so the live config says float32).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import warnings
from typing import Any

import torch

from mentor.utils.checkpoint import (ACTOR_DIR, HF_META_DIR, CheckpointError, dtype_name, find_latest_checkpoint,
                                     hf_class_name, is_complete, read_meta)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a config declares (``dtype`` or the older ``torch_dtype``), fp32 if none."""
    return DTYPES.get(dtype_name(config) or "", torch.float32)


def write_hf_folder(out_dir: str, config: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any = None,
                    generation_config: Any = None, dtype: torch.dtype | None = None) -> None:
    """Write full (unsharded) weights as a from_pretrained-able folder, cast to ``dtype`` (default: the config's)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or config_dtype(config)
    config = copy.deepcopy(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):  # a weightless shell: save_pretrained takes the tensors from ``state``
        shell = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing = sorted(set(shell.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"export: the weights lack {missing[:5]} of the {type(shell).__name__} built from "
                              "the config; is the config (--base-model) the one the checkpoint was trained from?")
    os.makedirs(out_dir, exist_ok=True)
    shell.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


def export_hf(model: torch.nn.Module, tokenizer: Any, generation_config: Any, out_dir: str,
              dtype: torch.dtype | None = None) -> None:
    """Export the live (FSDP2-sharded or plain) model to ``out_dir``. Collective: call on every rank.

    ``dtype`` None keeps the live config's dtype, float32 for fp32 master weights; pass the base model's
    (``config_dtype(AutoConfig.from_pretrained(model_path))``) to export e.g. bf16.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        config = copy.deepcopy(model.config)
        config.architectures = [hf_class_name(model)]
        write_hf_folder(out_dir, config, full, tokenizer, generation_config, dtype)
        logger.info("exported %s to %s", type(model).__name__, out_dir)
    if dist.is_initialized():
        dist.barrier()


def read_dcp_model_state(dcp_dir: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The ``model`` entries of a DCP checkpoint as plain full tensors (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not os.path.isfile(os.path.join(dcp_dir, ".metadata")):
        raise CheckpointError(f"{dcp_dir}: no DCP .metadata file; not a model checkpoint directory")
    metadata = FileSystemReader(dcp_dir).read_metadata()
    state = {key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{dcp_dir}: the checkpoint has no '{prefix}*' entries")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized ... single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({prefix.rstrip("."): state}, checkpoint_id=dcp_dir, no_dist=True)
    return state


def _hf_source(ckpt: str, base_model: str | None) -> str:
    """Where config/tokenizer come from: --base-model, else the checkpoint's copy, else meta's base model."""
    if base_model:
        if not os.path.isdir(base_model):
            raise CheckpointError(f"--base-model {base_model}: no such directory")
        return base_model
    own = os.path.join(ckpt, HF_META_DIR)
    if os.path.isfile(os.path.join(own, "config.json")):
        return own
    recorded = read_meta(ckpt).get("base_model")
    if recorded and os.path.isdir(recorded):
        return recorded
    raise CheckpointError(f"{ckpt}: the checkpoint has no {HF_META_DIR}/config.json and its base model "
                          f"({recorded}) is not a directory here; pass --base-model PATH")


def export_checkpoint(ckpt: str, out_dir: str, base_model: str | None = None, dtype: str = "auto",
                      overwrite: bool = False) -> str:
    """Offline export of a mentor checkpoint (or a save directory's latest) to ``out_dir``; returns ``out_dir``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if not os.path.isdir(ckpt):
        raise CheckpointError(f"checkpoint {ckpt}: no such directory")
    if not is_complete(ckpt):
        latest = find_latest_checkpoint(ckpt)
        if latest is None:
            raise CheckpointError(f"checkpoint {ckpt}: no COMPLETE marker and no complete global_step_N inside; "
                                  "a partial checkpoint (killed during save) cannot be exported")
        logger.info("%s is a save directory; exporting its latest checkpoint %s", ckpt, latest)
        ckpt = latest
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"output {out_dir} exists and is not empty; choose another or pass --overwrite")
    source = _hf_source(ckpt, base_model)
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = None
        logger.warning("%s has no generation_config.json; the export will have none", source)
    state = read_dcp_model_state(os.path.join(ckpt, ACTOR_DIR))
    partial = f"{out_dir.rstrip(os.sep)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # auto: the base model's dtype recorded at save time (the saved config says float32: fp32 master weights)
    out_dtype = DTYPES.get(dtype) or DTYPES.get(read_meta(ckpt).get("base_dtype") or "")
    write_hf_folder(partial, config, state, tokenizer, generation_config, out_dtype)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(partial, out_dir)
    logger.info("exported %s (config/tokenizer from %s) to %s", ckpt, source, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mentor.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="a global_step_N checkpoint directory (or a save dir: its latest)")
    parser.add_argument("out_dir", help="output folder for from_pretrained / vLLM")
    parser.add_argument("--base-model", default=None, help="config/tokenizer source (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights dtype (auto: the base model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_checkpoint(args.ckpt_dir, args.out_dir, args.base_model, args.dtype, args.overwrite)
    except CheckpointError as err:
        print(f"mentor.export: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
