"""A GGUF model's CPU-quantized form, kept after its first load so later loads skip every conversion.

Loading SmolLM2-135M with `--weights quantized` (the CPU default in bf16) spends its time converting: the header's
98k vocabulary strings parsed, 121 matmuls repacked into torch's int4 tile layout, the Q8_0 table dequantized for
the embedding lookup (~0.8 s on 2 cores, 2026-11-30). None of that depends on anything but the file, the dtype and
torch's packed layout, so the first load writes what it built (a safetensors file of every tensor, the config and
the tokenizer as JSON) into Ferry's cache folder, and a later load reads that instead: the GGUF is only stat'ed.

The key holds the file's path, size and modification time, the dtype, torch's version (the int4 tile layout is
torch's own), which kernel the blocks were packed for (Ferry's qmatmul, or torch's int4 where qmatmul is not built)
and FORMAT, which changes whenever what is stored or how it is packed does. A cache entry is written
to a temporary folder and renamed into place, so a crash never leaves half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ferry.cache import cache_root
from ferry.comm.group import ParallelGroup
from ferry.model.config import ModelConfig, RopeScaling
from ferry.model.layers.linear import QuantizableMatmul
from ferry.model.layers.quant import Int4Weight, Int8Weight, QMatmulWeight, qmatmul_unavailable
from ferry.model.tokenizer import FerryTokenizer

log = logging.getLogger("ferry.load")

FORMAT = 2


def entry_folder(path: Path, dtype: torch.dtype) -> Path:
    stat = path.stat()
    kernel = "qmatmul" if qmatmul_unavailable() is None else "torch-int4"
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{torch.__version__}|{kernel}|{FORMAT}"
    return cache_root() / "packed" / hashlib.sha256(ident.encode()).hexdigest()[:24]


def save(folder: Path, model, config: ModelConfig, tokenizer: FerryTokenizer) -> None:
    """Write `model` (a whole, quantized model) as a cache entry at `folder`."""
    from safetensors.torch import save_file

    tensors, formats = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizableMatmul) and isinstance(module.int4, QMatmulWeight):
            w = module.int4
            for field in ("packed", "scales", "mins"):
                tensors[f"{name}.qmatmul.{field}"] = getattr(w, field)
            formats[name] = {"qmatmul": [w.bits, w.offset, w.out_features]}
        elif isinstance(module, QuantizableMatmul) and module.int4 is not None:
            w = module.int4
            tensors[f"{name}.int4.packed"], tensors[f"{name}.int4.scale_zero"] = w.packed, w.scale_zero
            formats[name] = {"int4": [w.group_size, w.out_features, w.input_copies]}
        elif isinstance(module, QuantizableMatmul) and module.int8 is not None:
            tensors[f"{name}.int8.values"], tensors[f"{name}.int8.scales"] = module.int8.values, module.int8.scales
            formats[name] = {"int8": True}
    for name, param in model.named_parameters():
        if param.numel():
            tensors[name] = param.data
    tensors["rotary.cos"], tensors["rotary.sin"] = model.rotary.cos, model.rotary.sin
    meta = {
        "config": dataclasses.asdict(config),
        "formats": formats,
        "tokenizer": {"bos_token_id": tokenizer.bos_token_id, "eos_token_ids": list(tokenizer.eos_token_ids),
                      "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch / "tensors.safetensors"))
        (scratch / "tokenizer.json").write_text(tokenizer.tokenizer.to_str())
        (scratch / "meta.json").write_text(json.dumps(meta))
        os.replace(scratch, folder)  # a concurrent writer's entry is the same: whichever lands first stays
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not folder.is_dir():
            raise


def load(folder: Path, device: torch.device, dtype: torch.dtype):
    """(model, config, tokenizer) from the entry at `folder`, or None where there is none."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from ferry.model.loader import build_model

    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    cfg = dict(meta["config"])
    cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
    cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
    config = ModelConfig(**cfg)
    tok = meta["tokenizer"]
    tokenizer = FerryTokenizer(Tokenizer.from_str((folder / "tokenizer.json").read_text()), tok["bos_token_id"],
                               tuple(tok["eos_token_ids"]), tok["add_bos"], tok["chat_template"])
    tensors = load_file(str(folder / "tensors.safetensors"), device=str(device))
    model = build_model(config, device, dtype, ParallelGroup.single())
    modules = dict(model.named_modules())
    for name, kind in meta["formats"].items():
        module = modules[name]
        if "qmatmul" in kind:
            module.int4 = QMatmulWeight(*(tensors.pop(f"{name}.qmatmul.{f}") for f in ("packed", "scales", "mins")),
                                        *kind["qmatmul"])
        elif "int4" in kind:
            group_size, out_features, copies = kind["int4"]
            module.int4 = Int4Weight(tensors.pop(f"{name}.int4.packed"), tensors.pop(f"{name}.int4.scale_zero"),
                                     group_size, out_features, copies)
        else:
            module.int8 = Int8Weight(tensors.pop(f"{name}.int8.values"), tensors.pop(f"{name}.int8.scales"))
        if not getattr(module, "tied", False) or "int8" not in kind:
            module.weight = torch.nn.Parameter(module.weight.data.new_empty(0), requires_grad=False)
    model.rotary.cos, model.rotary.sin = tensors.pop("rotary.cos"), tensors.pop("rotary.sin")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        params[name].data = value
    return model, config, tokenizer
