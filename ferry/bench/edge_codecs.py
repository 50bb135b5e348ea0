"""What each hidden-state codec costs and what it changes: bytes per token, encode+decode time, and quality
against the uncompressed split (teacher-forced top-1 agreement, max logit error, perplexity on a shipped text)."""

from __future__ import annotations

import statistics
import time
from importlib import resources

import torch

from ferry.edge.codecs import Codec
from ferry.engine.kv_cache import KVCache
from ferry.model.loader import LoadedModel

DEFAULT_CODECS = ["fp32", "fp16", "bf16", "int8", "int4", "fp16+zstd", "int8+zstd", "int8+lz4", "int4+zstd"]


def eval_text() -> str:
    return resources.files("ferry.data").joinpath("eval_text.txt").read_text()


@torch.inference_mode()
def _split_logits(loaded: LoadedModel, ids: torch.Tensor, split: int, codec: Codec | None) -> torch.Tensor:
    model, cfg = loaded.model, loaded.config
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    cache = KVCache.for_model(model)
    cache.ensure(1, ids.shape[1])
    x = model.run_layers(model.embed_tokens(ids), positions, cache.layers[:split], ids.shape[1], range(split))
    if codec is not None:
        x = codec.decode(codec.encode(x[0]), ids.shape[1], cfg.hidden_size).to(device, dtype).unsqueeze(0)
    x = model.run_layers(x, positions, cache.layers[split:], ids.shape[1], range(split, cfg.num_layers))
    return model.logits(x)[0]


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1].cpu(), ids[0, 1:]).exp())


def codec_table(loaded: LoadedModel, split: int, codecs: list[str], text: str | None = None) -> list[dict]:
    ids = torch.tensor([loaded.tokenizer.encode(text or eval_text())])
    reference = _split_logits(loaded, ids, split, None)
    ref_top1 = reference.argmax(-1)
    ref_ppl = _perplexity(reference, ids)
    decode_step = torch.randn(1, loaded.config.hidden_size)  # one decode step's hidden state, for timing
    rows = []
    for name in codecs:
        codec = Codec.parse(name)
        logits = _split_logits(loaded, ids, split, codec)
        timings = []
        for _ in range(50):
            t = time.perf_counter()
            codec.decode(codec.encode(decode_step), 1, decode_step.shape[1])
            timings.append(time.perf_counter() - t)
        rows.append({
            "codec": name,
            "bytes_per_token": len(codec.encode(decode_step)),
            "bytes_vs_fp32": round(4 * decode_step.shape[1] / len(codec.encode(decode_step)), 2),
            "encode_decode_us": round(statistics.median(timings) * 1e6, 1),
            "top1_agreement": round(float((logits.argmax(-1) == ref_top1).float().mean()), 4),
            "max_logit_error": round(float((logits - reference).abs().max()), 4),
            "perplexity": round(_perplexity(logits, ids), 4),
            "perplexity_change": round(_perplexity(logits, ids) - ref_ppl, 4),
        })
    return rows


def plot(rows: list[dict], path) -> None:
    """Two bar charts side by side: bytes per decode token, and top-1 disagreement with the fp32 split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["codec"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.barh(names, [r["bytes_per_token"] for r in rows], color="tab:blue")
    left.set_xlabel("bytes per decode token (hidden state)")
    left.invert_yaxis()
    right.barh(names, [100 * (1 - r["top1_agreement"]) for r in rows], color="tab:red")
    right.set_xlabel("top-1 disagreement with fp32, % (teacher-forced)")
    right.invert_yaxis()
    fig.suptitle("Edge -> cloud hidden-state codecs (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
