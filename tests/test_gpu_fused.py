"""The fused decode kernels on GPUs (skipped elsewhere): each against the torch ops it replaces at real shapes,
the default model's greedy tokens with the kernels on and off, and on 2 GPUs the one-kernel all-reduce + add +
RMSNorm against the unfused path, eagerly and replayed in CUDA graphs of changing batch."""

from __future__ import annotations

import pytest
import torch

from ferry.parallel.launch import spawn

pytestmark = pytest.mark.gpu
BF16_ULP = 2**-7  # relative: one rounding of a bf16 value


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)).max())


def test_elementwise_kernels_match_the_torch_ops_at_llama3_8b_shapes():
    _needs(1)
    from ferry.model.config import RopeScaling
    from ferry.model.layers.fused import rmsnorm_reference
    from ferry.model.layers.fused_kernels import launch_add_rmsnorm, launch_rotary_kv_write, launch_silu_mul
    from ferry.model.layers.rotary import RotaryEmbedding, apply_rotary_joint

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(3)
    for rows in (1, 16):
        x = torch.randn(rows, 4096, device=dev, generator=gen).to(bf16)
        residual = torch.randn(rows, 4096, device=dev, generator=gen).to(bf16)
        weight = (torch.rand(4096, device=dev, generator=gen) + 0.5).to(bf16)
        expected_residual = residual + x
        expected = rmsnorm_reference(expected_residual, weight, 1e-5)
        out = launch_add_rmsnorm(x, residual, weight, 1e-5)
        print(f"add_rmsnorm, {rows} rows: {float((out == expected).float().mean()):.5f} bit-equal to the torch ops")
        assert torch.equal(residual, expected_residual)
        assert _rel(out, expected) <= BF16_ULP and float((out == expected).float().mean()) >= 0.99

        gate_up = (2 * torch.randn(rows, 2 * 14336, device=dev, generator=gen)).to(bf16)
        gate, up = gate_up.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        out = launch_silu_mul(gate_up)
        print(f"silu_mul, {rows} rows: {float((out == expected).float().mean()):.5f} bit-equal to the torch ops")
        assert _rel(out, expected) <= BF16_ULP and float((out == expected).float().mean()) >= 0.99

    q_heads, kv_heads, hd, tokens = 32, 8, 128, 16
    rotary = RotaryEmbedding(hd, 8192, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    rotary.build_tables(dev)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * hd, device=dev, generator=gen).to(bf16)
    bias = torch.randn(qkv.shape[1], device=dev, generator=gen).to(bf16)
    positions = torch.randint(0, 8192, (tokens,), device=dev, generator=gen)
    slots = torch.randperm(64 * 16, device=dev, generator=gen)[:tokens].to(torch.int32)
    k_pool = torch.zeros(64, 16, kv_heads, hd, dtype=bf16, device=dev)
    v_pool = torch.zeros_like(k_pool)
    q = launch_rotary_kv_write(qkv, bias, positions, rotary.cos, rotary.sin, slots, k_pool, v_pool, q_heads, kv_heads, hd)
    full = qkv + bias
    cos, sin = rotary.tables_for(positions.view(1, -1), bf16)
    ref_q, ref_k = apply_rotary_joint(full[:, : (q_heads + kv_heads) * hd].view(1, tokens, -1, hd), q_heads, cos, sin)
    k = k_pool.view(-1, kv_heads, hd)[slots.long()]
    print(f"rotary: q {float((q == ref_q[0]).float().mean()):.5f}, k {float((k == ref_k[0]).float().mean()):.5f} of "
          "elements bit-equal to the torch ops")
    assert torch.equal(q, ref_q[0]) and torch.equal(k, ref_k[0])  # no reduction inside: bit for bit
    assert torch.equal(v_pool.view(-1, kv_heads, hd)[slots.long()], full[:, (q_heads + kv_heads) * hd:].view(tokens, kv_heads, hd))


def test_default_model_greedy_tokens_are_the_same_with_the_kernels_on_and_off(smollm_path):
    """fp32 on the GPU (the kernels take any float dtype): the fused steps change nothing a token depends on."""
    _needs(1)
    from ferry.engine.engine import Engine
    from ferry.engine.sampling import SamplingParams
    from ferry.model.layers import fused
    from ferry.model.loader import load_model

    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at"]
    tokens = {}
    for on in (True, False):
        fused.set_enabled(on)
        try:
            loaded = load_model(smollm_path, torch.device("cuda"), torch.float32, show_progress=False)
            engine = Engine(loaded.model, loaded.tokenizer)
            assert ("fused Triton kernels" in engine.decode_path) == on
            out = engine.generate([loaded.tokenizer.encode(p) for p in prompts],
                                  SamplingParams(max_tokens=32, ignore_eos=True))
            tokens[on] = [c.token_ids for c in out]
        finally:
            fused.set_enabled(True)
    assert tokens[True] == tokens[False]


def _fused_in_graphs(group) -> dict:
    """Fused calls of 1, 16, 1 and 128 rows captured in one CUDA graph and replayed on fresh inputs, after the same
    calls eagerly: each equals the unfused sum + add + norm (NCCL, then the add+RMSNorm kernel), and every rank
    holds the same bits."""
    import torch.distributed as dist

    from ferry.comm.allreduce_engine import FUSION_MAX_BYTES
    from ferry.comm.allreduce_paths import fused_norm_path
    from ferry.model.layers import fused as fused_ops

    dev = torch.device(f"cuda:{group.rank}")
    path, why = fused_norm_path(group.process_group, dev, torch.bfloat16, FUSION_MAX_BYTES)
    assert path is not None, why
    weight = (torch.rand(4096, device=dev, generator=torch.Generator(device=dev).manual_seed(5)) + 0.5).to(torch.bfloat16)
    shapes = [1, 16, 1, 128]
    report = []

    def check(tag, residuals, outs, fresh, start):
        for i, (f, s) in enumerate(zip(fresh, start, strict=True)):
            total = f.clone()
            dist.all_reduce(total, group=group.process_group)
            expected_residual = s.clone()
            expected = fused_ops.add_rmsnorm(total, expected_residual, weight, 1e-5)
            gathered = [torch.empty_like(outs[i]) for _ in range(group.world_size)]
            dist.all_gather(gathered, outs[i], group=group.process_group)
            report.append({"run": tag, "call": i, "residual": torch.equal(residuals[i], expected_residual),
                           "normed": torch.equal(outs[i], expected),
                           "every_rank": all(torch.equal(g, gathered[0]) for g in gathered)})

    def inputs(seed):
        gen = torch.Generator(device=dev).manual_seed(seed * 10 + group.rank)
        shared = torch.Generator(device=dev).manual_seed(seed)
        fresh = [(torch.randn(r, 4096, device=dev, generator=gen) * 0.1).to(torch.bfloat16) for r in shapes]
        return fresh, [torch.randn(r, 4096, device=dev, generator=shared).to(torch.bfloat16) for r in shapes]

    fresh, start = inputs(0)
    residuals = [s.clone() for s in start]
    outs = [path.reduce_add_norm(f.clone(), r, weight, 1e-5) for f, r in zip(fresh, residuals, strict=True)]
    torch.cuda.synchronize(dev)
    check("eager", residuals, outs, fresh, start)

    partials = [torch.zeros(r, 4096, dtype=torch.bfloat16, device=dev) for r in shapes]
    residuals = [torch.zeros_like(p) for p in partials]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up outside the capture, the same calls on every rank
        for p, r in zip(partials, residuals, strict=True):
            path.reduce_add_norm(p, r, weight, 1e-5)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [path.reduce_add_norm(p, r, weight, 1e-5) for p, r in zip(partials, residuals, strict=True)]
    for replay in range(1, 4):
        fresh, start = inputs(replay)
        for p, r, f, s in zip(partials, residuals, fresh, start, strict=True):
            p.copy_(f)
            r.copy_(s)
        graph.replay()
        torch.cuda.synchronize(dev)
        check(f"replay {replay}", residuals, outs, fresh, start)
    return {"report": report, "error": int(path.error.item()), "calls": int(path.state[0])}


def test_fused_allreduce_add_norm_is_exact_in_cuda_graphs_of_changing_batch():
    _needs(2)
    result = spawn(2, "cuda", _fused_in_graphs, ())
    bad = [r for r in result["report"] if not (r["residual"] and r["normed"] and r["every_rank"])]
    assert len(result["report"]) == 16 and bad == [] and result["error"] == 0, bad
    assert result["calls"] == 7 + 4 + 4 + 3 * 4  # self-test, eager, warm-up, three replays of four calls


def test_fused_allreduce_bench_runs_and_checks_every_size(tmp_path):
    _needs(2)
    from ferry.bench.fused_norm import run

    result, json_path, _ = run(2, 4096, tmp_path, sizes=[8 << 10, 64 << 10, 1 << 20])
    assert result["wrong"] == [] and result["error_word"] == 0
    assert json_path.exists()
