"""Teacher-forced logits through the serving engine's own decode step: a text fed one token per step, each step the
path the engine runs for a decoding sequence (the compiled CPU step where it has one, else eager), so a quality
figure describes the numerics that decode really has. A prefill over the whole text, which is what
tp_quality.teacher_forced_logits runs, takes other kernels (batched matmuls, SDPA) than one-token steps do."""

from __future__ import annotations

import torch

from ferry.engine.block_manager import NULL_BLOCK, BlockTable
from ferry.errors import FerryError
from ferry.model.layers.attention import PagedBatch


@torch.inference_mode()
def decode_forced_logits(engine, ids: list[int]) -> torch.Tensor:
    """[1, len(ids), vocab] fp32 logits: row p is what the decode step gives after ids[: p + 1]. `engine` must be
    idle; its blocks are borrowed for the text and given back."""
    table = BlockTable()
    if not engine.blocks.ensure_slots(table, len(ids)):
        raise FerryError(f"the KV cache cannot hold {len(ids)} tokens for the quality pass")
    bs = engine.blocks.block_size
    blocks = torch.tensor(table.blocks + [NULL_BLOCK], dtype=torch.int32)  # a junk column for the minimum width
    rows = []
    try:
        for p, token in enumerate(ids):
            width = max(engine.inputs.min_width, p // bs + 1)
            paged = PagedBatch(slots=torch.tensor([int(blocks[p // bs]) * bs + p % bs], dtype=torch.int32),
                               decode_rows=1, block_tables=blocks[:width].view(1, width).clone(),
                               context_lens=torch.tensor([p + 1], dtype=torch.int32))
            token_t = torch.tensor([token], dtype=torch.int32)
            position = torch.tensor([p], dtype=torch.int32)
            logits = engine.step_logits(token_t, position, paged, torch.zeros(1, dtype=torch.long))
            rows.append(logits[0].float())
    finally:
        engine.blocks.free(table)
    return torch.stack(rows)[None]
