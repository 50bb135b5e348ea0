"""The fused decode kernels on CPU: run in Triton's interpreter against the torch ops they replace (roundings as on
GPUs), compiled for Hopper by Triton's real compiler, and the all-reduce engine's choice between the fused
all-reduce + add + RMSNorm and the unfused path. The GPU tests (test_gpu_fused.py) check them on the hardware."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ferry.comm.allreduce_engine import AllReduceEngine, FusionChoice, SizeChoice, choose_fusion, parse_mode
from ferry.errors import FerryError

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str, interpret: bool = False) -> dict | list:
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)} | ({"TRITON_INTERPRET": "1"} if interpret else {})
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=300, check=False,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_elementwise_kernels_match_the_torch_ops_they_replace():
    """fp32 within reduction order (a norm's sum); bf16 bit-exact with the interpreter rounding as GPUs do."""
    results = _run("fused_kernels_interpreted.py", interpret=True)
    assert {r["kernel"] for r in results} == {"add_rmsnorm", "silu_mul", "rotary_kv_write"}
    for r in results:
        diffs = [v for k, v in r.items() if k.endswith("_diff")]
        limit = 0.0 if r["dtype"] == "torch.bfloat16" else 2e-6
        assert max(diffs) <= limit, r
        if r["kernel"] == "add_rmsnorm":
            assert r["residual_diff"] == 0.0 and r["out_dtype"] == r["dtype"], r
        if r["kernel"] == "rotary_kv_write":
            assert r["other_slots_untouched"], r


@pytest.mark.parametrize("world", [2, 3])
def test_fused_allreduce_add_norm_over_calls_of_changing_size(world):
    """One process per rank, each pushing into its peers' buffers: 8 calls of 1..4 rows (every generation used,
    cleared at one length, reused at another; -0.0 in the inputs), norm on and off. The residual equals the
    unfused sum + add bit for bit on every rank, the norm too, and only the last call's data is left."""
    result = _run("fused_norm_interpreted.py", str(world))
    assert result["exit_codes"] == [0] * world and result["errors"] == [0] * world
    assert result["calls"] == [8] * world  # the device-side call counter advanced once per call
    assert result["residual_exact"] and result["same_on_every_rank"] and result["norm_max_diff"] == 0.0
    assert result["words_not_sentinel"] == [world * 3 * 40] * world  # the last call: 3 rows of 40 per source


def test_fused_allreduce_with_a_missing_peer_sets_the_error_word_instead_of_hanging():
    result = _run("fused_norm_interpreted.py", "2", "1")
    assert result["exit_codes"] == [0] and result["errors"] == [1] and result["calls"] == [1]


def _compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int = 4) -> str:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature | {k: "constexpr" for k in constexprs}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]  # ptxas accepted it
    return compiled.asm["ptx"]


def test_fused_kernels_compile_for_hopper_with_the_real_compiler():
    """The interpreter runs what the compiler may reject; Triton's real pipeline needs no GPU."""
    pytest.importorskip("triton")
    from ferry.comm.fused_norm_kernel import lamport_allreduce_norm_kernel
    from ferry.model.layers.fused_kernels import add_rmsnorm_kernel, rotary_kv_write_kernel, silu_mul_kernel

    bf16 = "*bf16"
    _compile_for_hopper(add_rmsnorm_kernel, {"x_ptr": bf16, "residual_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16,
                                             "n_cols": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32",
                                             "stride_o": "i32"}, {"HAS_RESIDUAL": True, "BLOCK": 4096}, 16)
    _compile_for_hopper(silu_mul_kernel, {"in_ptr": bf16, "out_ptr": bf16, "n_cols": "i32", "stride_in": "i32",
                                          "stride_out": "i32"}, {"BLOCK": 1024})
    _compile_for_hopper(rotary_kv_write_kernel,
                        {"qkv_ptr": bf16, "bias_ptr": bf16, "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                         "slot_ptr": "*i32", "q_out_ptr": bf16, "k_pool_ptr": bf16, "v_pool_ptr": bf16,
                         "stride_qkv": "i32", "stride_table": "i32", "stride_slot": "i32"},
                        {"Q_HEADS": 16, "KV_HEADS": 4, "HEAD_DIM": 128, "HALF_PAD": 64, "HAS_BIAS": True}, 1)
    ptx = _compile_for_hopper(lamport_allreduce_norm_kernel,
                              {"partial_ptr": bf16, "residual_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16,
                               "buffer_ptrs": "*i64", "state_ptr": "*i64", "error_ptr": "*i32", "n_cols": "i32",
                               "slot_elems": "i32", "eps": "fp32", "rank": "i32"},
                              {"world": 2, "BLOCK": 4096, "HAS_NORM": True}, 8)
    assert "ld.volatile" in ptx  # peers' pushes are polled past the caches


def test_allreduce_mode_takes_a_fusion_suffix_and_names_a_bad_one():
    assert parse_mode("auto") == ("auto", "auto")
    assert parse_mode("auto,unfused") == ("auto", "unfused")
    assert parse_mode("symm_one_shot") == ("symm_one_shot", "unfused")  # a forced path is that path alone
    assert parse_mode("symm_one_shot,fused") == ("symm_one_shot", "fused")
    with pytest.raises(FerryError, match="after the comma give fused or unfused"):
        parse_mode("auto,fastest")


class _Plain:
    name = "process_group"

    def fits(self, tensor):
        return True

    def reduce(self, tensor):
        return tensor * 2  # as if a second rank held the same partial


class _Fused:
    name, max_bytes = "ferry_fused_norm", 1 << 20

    def __init__(self):
        self.seen = []

    def fits(self, partial, residual):
        return True

    def reduce_add_norm(self, partial, residual, weight, eps):
        self.seen.append(partial.numel() * partial.element_size())
        residual.add_(partial * 2)
        return torch.zeros_like(partial)


def test_sums_feeding_a_norm_take_the_fused_kernel_where_its_table_says():
    choice = choose_fusion({8 << 10: {"fused": 4.0, "unfused": 9.0}, 128 << 10: {"fused": 9.0, "unfused": 9.0}})
    assert [r.fused for r in choice] == [True, False]  # a tie stays unfused
    fused = _Fused()
    engine = AllReduceEngine([_Plain()], [SizeChoice(64 << 20, "process_group", {})], fused=fused,
                             fusion=[FusionChoice(8 << 10, True, {}), FusionChoice(1 << 20, False, {})])
    weight = torch.ones(1024)
    for rows in (1, 2, 4):  # 4 KiB and 8 KiB fused; 16 KiB unfused
        partial, residual = torch.ones(rows, 1024), torch.ones(rows, 1024)
        out = engine.reduce_add_norm(partial, residual, weight, 1e-5)
        assert torch.equal(residual, torch.full((rows, 1024), 3.0))  # the same sum + add either way
        assert out.shape == partial.shape
    assert fused.seen == [4 << 10, 8 << 10] and engine.calls == {"process_group": 1, "ferry_fused_norm": 2}
    # Forced off, every sum runs unfused; forced on, every size the kernel holds runs fused.
    assert not AllReduceEngine([_Plain()], engine.table, fused=_Fused(), fusion="unfused").fuses(4 << 10)
    forced = AllReduceEngine([_Plain()], engine.table, fused=_Fused(), fusion="fused")
    assert forced.fuses(1 << 20) and not forced.fuses((1 << 20) + 2)
    assert "ferry_fused_norm" not in AllReduceEngine([_Plain()], engine.table).calls  # none here: nothing to count


def test_the_fused_kernels_run_only_on_cuda_and_the_cpu_path_is_the_torch_ops():
    from ferry.model.layers import fused

    assert fused.path(torch.device("cpu")) == fused.TORCH_PATH
    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8) + 0.5
    expected_residual = residual + x
    out = fused.add_rmsnorm(x, residual, weight, 1e-6)
    assert torch.equal(residual, expected_residual)
    assert torch.equal(out, fused.rmsnorm_reference(expected_residual, weight, 1e-6))
    assert fused.add_rmsnorm(x, residual, None, 1e-6) is None and torch.equal(residual, expected_residual + x)


def test_forcing_the_fused_kernel_where_it_cannot_run_is_refused_by_name():
    from ferry.comm.allreduce_engine import _fused_path

    skipped: dict[str, str] = {}
    with pytest.raises(FerryError, match="kernel cannot run here: symmetric memory needs CUDA devices"):
        _fused_path("fused", None, torch.device("cpu"), torch.float32, skipped)
    assert _fused_path("auto", None, torch.device("cpu"), torch.float32, skipped) is None  # auto: skipped, named
    assert skipped == {"ferry_fused_norm": "symmetric memory needs CUDA devices"}
