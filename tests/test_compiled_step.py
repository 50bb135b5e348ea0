"""The compiled decode step's settings: Ferry's mode by default, torch's on request, inductor's caches kept in
Ferry's cache folder (so a machine compiles once), and a recompile limit above the number of graph buckets (torch's
default would send later buckets to eager kernels without a word)."""

from __future__ import annotations

import torch

from ferry.engine.compiled_step import FAST_MODE, RECOMPILE_LIMIT, compile_decode_step


def test_compile_uses_ferrys_mode_and_keeps_its_caches_in_ferrys_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = torch.nn.Linear(4, 4)
    compiled, mode = compile_decode_step(model, None)
    assert mode == FAST_MODE == "max-autotune-no-cudagraphs"
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


def test_a_cache_folder_the_user_chose_is_kept_and_torchs_default_mode_can_be_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    _, mode = compile_decode_step(torch.nn.Linear(4, 4), "default")
    assert mode == "default" and __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_warm_up_without_graphs_does_nothing(tmp_path):
    from ferry.bench.shapes import TINY, random_model
    from ferry.engine.static_engine import StaticBatchEngine

    engine = StaticBatchEngine(random_model(TINY, torch.device("cpu"), torch.float32), None)
    engine.warm_up()
    assert engine.graphs is None and engine.cache.max_len == 0  # CPU: no graphs, nothing reserved
