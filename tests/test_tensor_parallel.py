"""Tensor parallelism on CPU with gloo: tp=2 and tp=3 (uneven head splits) match tp=1, layouts that cannot
work are refused by name, and a rank that dies ends the run promptly with no processes left."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ferry.bench.tp_quality import compare, full_logits_on_ranks
from ferry.engine.engine import Engine
from ferry.engine.sampling import SamplingParams
from ferry.errors import FerryError
from ferry.model.layers.heads import HeadShard
from ferry.parallel.launch import free_port, spawn
from ferry.parallel.layout import check_device_count, check_tensor_parallel
from ferry.parallel.tp_generate import GenerateJob, run_generate

PROMPTS = ("The capital of France is", "def add(a, b):", "Once upon a time, in a quiet village,",
           "List three colours:", "Water freezes at", "My favourite book is")
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])  # 4 > SmolLM2's 3 KV heads: KV heads replicated
def test_tp_logits_match_tp1_within_fp32_tolerance(ferry_smollm, smollm_path, tp):
    ids = [ferry_smollm.tokenizer.encode("Tensor parallel ranks each hold a slice of every layer.")]
    x = torch.tensor(ids)
    from ferry.engine.kv_cache import KVCache

    cfg = ferry_smollm.config
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    cache.ensure(*x.shape)
    with torch.inference_mode():
        ref = ferry_smollm.model.full_logits(x, cache.layers)
    ours = spawn(tp, "cpu", full_logits_on_ranks, (str(smollm_path), ids))
    err = float((ours - ref).abs().max())
    print(f"tp={tp}: max |logit error| vs tp=1 = {err:.2e}")
    assert err < 1e-3  # same fp32 maths, different summation order across ranks


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])  # even KV heads, replicated KV heads (uneven ones: test_heterogeneous.py)
def test_tp_greedy_tokens_match_tp1(ferry_smollm, smollm_path, tp):
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS]
    reference = [c.token_ids for c in Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, GREEDY)]
    result = spawn(tp, "cpu", run_generate, (GenerateJob(str(smollm_path), "cpu", None, PROMPTS, GREEDY),))
    assert [c["token_ids"] for c in result["completions"]] == reference
    assert len(result["peak_host_mb_per_rank"]) == tp


def test_layouts_that_cannot_work_are_refused_by_name(ferry_smollm):
    check_tensor_parallel(ferry_smollm.config, 4)  # KV heads replicated
    with pytest.raises(FerryError, match="more ranks than this model's 9 attention heads"):
        check_tensor_parallel(ferry_smollm.config, 10)
    with pytest.raises(FerryError, match="needs 4 cuda devices, but 2 are present"):
        check_device_count("cuda", 4, 2)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 2), (32, 8), (64, 8), (12, 4), (7, 1)])
def test_head_shards_cover_every_query_head_once_with_the_kv_heads_it_reads(heads, kv_heads):
    group = heads // kv_heads
    for tp in range(1, heads + 1):
        shards = [HeadShard.for_rank(heads, kv_heads, tp, r) for r in range(tp)]
        owned = [q for s in shards for q in range(s.q_start, s.q_stop)]
        assert owned == list(range(heads)), (tp, shards)
        for s in shards:
            assert s.num_heads >= 1
            for q, local_kv in zip(range(s.q_start, s.q_stop), s.kv_of_query):
                assert s.kv_start + local_kv == q // group
            assert set(s.kv_of_query) == set(range(s.num_kv_heads))  # no KV head held for nothing
            assert s.replicates_kv == (tp > kv_heads and s.num_heads < group * s.num_kv_heads)
        # Balance: query heads differ by at most one between ranks when KV heads are replicated.
        if tp > kv_heads:
            assert max(s.num_heads for s in shards) - min(s.num_heads for s in shards) <= 1


def test_smollm2_tp4_replicates_kv_heads_as_documented():
    shards = [HeadShard.for_rank(9, 3, 4, r) for r in range(4)]
    assert [(s.q_start, s.q_stop, s.kv_start, s.kv_stop) for s in shards] == [
        (0, 3, 0, 1), (3, 5, 1, 2), (5, 7, 1, 3), (7, 9, 2, 3)]
    assert HeadShard.for_rank(8, 2, 3, 1).local_group is None  # queries 3,4,5 read KV heads 0,1,1: gathered


def _uneven_gqa_checkpoint(folder: Path) -> Path:
    """A random Llama with 8 query / 2 KV heads: at tp=3 rank 1 holds queries 3..5 over KV heads 0 and 1 unequally."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                                      tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0, 1 / param.shape[-1] ** 0.5 if param.dim() == 2 and "embed" not in name else 1)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.slow
def test_replicated_kv_heads_with_unequal_local_groups_match_tp1(tmp_path):
    from ferry.engine.kv_cache import KVCache
    from ferry.model.loader import load_model

    folder = _uneven_gqa_checkpoint(tmp_path)
    ids = [torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3)).tolist()]
    loaded = load_model(folder, torch.device("cpu"), torch.float32, show_progress=False)
    cache = KVCache.for_model(loaded.model)
    cache.ensure(1, 40)
    with torch.inference_mode():
        ref = loaded.model.full_logits(torch.tensor(ids), cache.layers)
    ours = spawn(3, "cpu", full_logits_on_ranks, (str(folder), ids))
    assert float((ours - ref).abs().max()) < 1e-4


def test_tp_on_cuda_without_gpus_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", "x", "--tp", "2", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no cuda device" in out.stderr and "Traceback" not in out.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


class _TpRun:
    """`ferry generate --tp 2 --verbose` on CPU, its stderr read line by line on a thread, so the test can wait for
    what the ranks themselves report (joined the group with their pid, engine ready to decode) instead of sleeping."""

    def __init__(self, max_tokens: int = 4000) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "generate", "Tell me a long story.", "--tp", "2", "--device", "cpu",
             "--max-tokens", str(max_tokens), "--ignore-eos", "--verbose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_until_decoding(self, timeout_s: float = 120) -> dict[int, int]:
        """Rank -> pid, once both ranks said they joined and both engines are built (decode starts next)."""
        pids: dict[int, int] = {}
        engines: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(pids) < 2 or len(engines) < 2:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"ferry exited before the ranks were decoding:\n{''.join(self.stderr)[-3000:]}"
            if joined := re.match(r"ferry: rank (\d): ferry.launch: rank \d of 2 joined the group \(pid (\d+)\)", line):
                pids[int(joined[1])] = int(joined[2])
            elif ready := re.match(r"ferry: rank (\d): ferry.engine: engine on cpu", line):
                engines.add(int(ready[1]))
        return pids

    def wait(self, timeout_s: float) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code, "".join(self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.mark.slow
def test_killing_one_rank_ends_the_run_quickly_with_no_processes_left():
    run = _TpRun()
    try:
        pids = run.wait_until_decoding()
        assert all(_alive(pid) for pid in pids.values())
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        code, stderr = run.wait(timeout_s=90)
        assert code == 2 and time.monotonic() - killed_at < 60
        assert "ferry: error: rank 1 killed by signal 9" in stderr, stderr[-2000:]
        assert "Traceback" not in stderr.split("ferry: error:")[-1]
        assert not [pid for pid in pids.values() if _alive(pid)], "orphan rank processes left"
    finally:
        run.close()


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_stops_tp_generate_with_status_130():
    run = _TpRun()
    try:
        pids = run.wait_until_decoding()
        assert all(_alive(pid) for pid in pids.values())
        os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
        code, stderr = run.wait(timeout_s=60)
        assert code == 130, stderr[-2000:]
        assert stderr.rstrip().endswith("ferry: interrupted"), stderr[-2000:]
        assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr, stderr[-2000:]
        # The parent joins its ranks before it exits: none may outlive it, not even briefly.
        assert not [pid for pid in pids.values() if _alive(pid)], "orphan rank processes left"
    finally:
        run.close()


@pytest.mark.slow
def test_int8_compressed_allreduce_stays_close_to_the_exact_path(ferry_smollm, smollm_path):
    """Off by default; when on, teacher-forced agreement and perplexity on the shipped text stay close."""
    from ferry.bench.edge_codecs import eval_text

    ids = [ferry_smollm.tokenizer.encode(eval_text())[:192]]
    exact = spawn(2, "cpu", full_logits_on_ranks, (str(smollm_path), ids))
    compressed = spawn(2, "cpu", full_logits_on_ranks, (str(smollm_path), ids), compression="int8")
    quality = compare(exact, compressed, ids)
    print(f"int8 all-reduce vs exact (tp=2): {quality}")
    assert 0 < quality["max_logit_error"]  # the compressed path really ran
    assert quality["top1_agreement"] >= 0.95
    assert abs(quality["perplexity_variant"] - quality["perplexity_exact"]) / quality["perplexity_exact"] < 0.05


def _agreement_verdicts(group, odd_rank: int) -> list[str | None]:
    """check_ranks_agree on identical completions, then with `odd_rank` holding one different token."""
    from ferry.engine.engine import Completion
    from ferry.parallel.tp_generate import check_ranks_agree

    def completions(last: int) -> list[Completion]:
        return [Completion([1, 2], [5, 6, 7], "", "length", 0.0, 0.0), Completion([3], [8, last], "", "length", 0.0, 0.0)]

    verdicts = []
    for tokens in (completions(9), completions(10 if group.rank == odd_rank else 9)):
        try:
            check_ranks_agree(group, tokens, torch.device("cpu"))
            verdicts.append(None)
        except FerryError as exc:
            verdicts.append(str(exc))
    return verdicts


@pytest.mark.slow
def test_ranks_that_produced_different_tokens_are_an_error_naming_them():
    agreed, disagreed = spawn(3, "cpu", _agreement_verdicts, (2,))
    assert agreed is None
    assert disagreed == "tensor-parallel ranks [2] produced different tokens than rank 0"


def _compressed_sums(group) -> dict:
    """Every rank's int8 all-reduce result (gathered bit for bit), and the exact sum for comparison."""
    gen = torch.Generator().manual_seed(100 + group.rank)  # different partial sums on every rank
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 576, generator=gen).to(dtype)
        x[:, group.rank * 7] *= 300  # an outlier channel, different per rank (the escape path)
        exact = x.clone()
        torch.distributed.all_reduce(exact)
        summed = group.all_reduce(x.clone(), compressible=True)
        bits = summed.float().view(torch.int32)  # bf16 -> fp32 is exact: same bits in, same bits out
        gathered = [torch.empty_like(bits) for _ in range(group.world_size)]
        torch.distributed.all_gather(gathered, bits)
        out[dtype] = (gathered, summed, exact)
    return out


@pytest.mark.slow
def test_int8_compressed_allreduce_gives_every_rank_bit_identical_sums():
    """The SPMD engine needs every rank to continue from the same hidden state: the lossy sum must be the same bits
    on each rank (each sums the dequantized shards in rank order), not merely close."""
    for dtype, (gathered, summed, exact) in spawn(3, "cpu", _compressed_sums, (), compression="int8").items():
        assert all(torch.equal(g, gathered[0]) for g in gathered[1:]), dtype
        err = float((summed.float() - exact.float()).abs().max())
        assert 0 < err < 0.05 * float(exact.float().abs().max()), (dtype, err)  # lossy, really compressed, close


@pytest.mark.slow
def test_the_same_command_runs_under_torchrun(ferry_smollm):
    import json
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "ferry.cli", "generate",
                          PROMPTS[0], "--device", "cpu", "--max-tokens", "12", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)  # only rank 0 printed
    ids = [ferry_smollm.tokenizer.encode(PROMPTS[0])]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = Engine(ferry_smollm.model, ferry_smollm.tokenizer).generate(ids, params)[0].token_ids
    assert doc["tp"] == 2 and doc["completions"][0]["token_ids"] == reference


@pytest.fixture(scope="module")
def llm_tp2(smollm_path):
    from ferry.api import LLM

    with LLM(str(smollm_path), device="cpu", tp=2) as llm:
        yield llm


@pytest.mark.slow
def test_python_api_tp2_serves_many_requests_like_tp1(ferry_smollm, llm_tp2):
    engine = Engine(ferry_smollm.model, ferry_smollm.tokenizer)
    ids = [ferry_smollm.tokenizer.encode(p) for p in PROMPTS[:3]]
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    for params in (GREEDY, seeded):  # two requests to the same loaded ranks
        ours = llm_tp2.generate(list(PROMPTS[:3]), params)
        assert [c.token_ids for c in ours] == [c.token_ids for c in engine.generate(ids, params)]
    info = llm_tp2.parallel_info
    assert info["tp"] == 2 and len(info["peak_host_mb_per_rank"]) == 2


@pytest.mark.slow
def test_python_api_tp2_refuses_a_bad_request_and_keeps_serving(llm_tp2):
    from ferry.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        llm_tp2.generate(["word " * 9000], GREEDY)
    assert llm_tp2.generate([PROMPTS[0]], GREEDY)[0].token_ids  # the ranks are still there, still in step


@pytest.mark.slow
def test_python_api_tp2_unseeded_sampling_keeps_the_ranks_together(llm_tp2):
    # Ranks that drew different samples would feed different tokens and break apart (or hang at EOS).
    params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)  # an early EOS would tie the runs
    runs = [llm_tp2.generate([PROMPTS[2]], params)[0] for _ in range(2)]
    assert all(r.token_ids for r in runs) and runs[0].token_ids != runs[1].token_ids  # really sampled
    events = list(llm_tp2.stream([PROMPTS[0]], GREEDY))
    assert "".join(e.text for e in events) == llm_tp2.generate([PROMPTS[0]], GREEDY)[0].text
    abandoned = llm_tp2.stream([PROMPTS[1]], GREEDY)
    next(abandoned)  # the caller stops reading after one token; the ranks finish that request regardless
    abandoned.close()
    assert llm_tp2.generate([PROMPTS[0]], GREEDY)[0].text == "".join(e.text for e in events)


@pytest.mark.slow
def test_python_api_tp_rank_death_is_named_and_close_leaves_nothing(smollm_path):
    from ferry.api import LLM

    llm = LLM(str(smollm_path), device="cpu", tp=2)
    procs = llm.workers._procs
    os.kill(procs[1].pid, signal.SIGKILL)
    started = time.time()
    with pytest.raises(FerryError, match="rank 1 killed by signal 9"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=400, ignore_eos=True))
    assert time.time() - started < 60
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(FerryError, match="stopped"):
        llm.generate([PROMPTS[0]], GREEDY)


@pytest.mark.slow
def test_chat_with_tp2_answers_and_exits_cleanly():
    out = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "chat", "--device", "cpu", "--max-tokens", "16", "--tp", "2"],
        input="What is the capital of France?\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "tensor parallel" in out.stderr
    assert "Paris" in out.stdout, out.stdout


def _prefill_with_and_without_overlap(group, path: str, ids: list[list[int]]) -> dict:
    from ferry.model.loader import load_model

    torch.set_num_threads(1)
    group = group.with_allreduce("process_group", torch.device("cpu"), torch.float32)  # forced: must hold in both
    loaded = load_model(path, torch.device("cpu"), torch.float32, group=group, show_progress=False)
    model = loaded.model
    x = torch.tensor(ids)
    positions = torch.arange(x.shape[1]).expand_as(x)
    from ferry.engine.kv_cache import KVCache

    runs = []
    overlapped = model._run_layers_overlapped
    model._run_layers_overlapped = lambda *a: runs.append(1) or overlapped(*a)
    out = {"overlapped_runs": runs, "layers": len(model.layers)}
    for overlap in (False, True):
        before = group.allreduce.calls["process_group"]
        model.overlap_micro_batches = overlap
        cache = KVCache.for_model(model)
        cache.ensure(*x.shape)
        with torch.inference_mode():
            out[overlap] = (model.logits(model.hidden_states(x, positions, cache.layers, x.shape[1])),
                            cache.layers[-1][0][: x.shape[0], : x.shape[1]].clone())
        out[f"calls_{overlap}"] = group.allreduce.calls["process_group"] - before
    return out


@pytest.mark.slow
def test_prefill_micro_batch_overlap_gives_the_same_logits_and_cache(ferry_smollm, smollm_path):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, ferry_smollm.config.vocab_size, (5, 24), generator=gen).tolist()  # odd batch: 2 + 3 rows
    out = spawn(2, "cpu", _prefill_with_and_without_overlap, (str(smollm_path), ids))
    (plain, plain_k), (overlapped, overlapped_k) = out[False], out[True]
    assert out["overlapped_runs"] == [1]  # the overlap schedule ran, once, only when asked
    # Its asynchronous sums go through the all-reduce engine too (counted, forced path respected): two
    # micro-batches make two all-reduces of each layer's attention and MLP where one batch made one.
    assert out["calls_True"] - out["calls_False"] == 2 * out["layers"]
    assert float((plain - overlapped).abs().max()) < 1e-4
    assert float((plain_k - overlapped_k).abs().max()) < 1e-4  # micro-batch B wrote its own cache rows
    assert torch.equal(plain.argmax(-1), overlapped.argmax(-1))


@pytest.mark.slow
def test_overlap_prefill_generates_the_tp1_tokens_and_needs_tp():
    import json

    ref = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", *PROMPTS[:3], "--device", "cpu",
                          "--dtype", "fp32", "--max-tokens", "8", "--ignore-eos", "--json"], capture_output=True, text=True, timeout=300)
    ours = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", *PROMPTS[:3], "--device", "cpu", "--tp", "2",
                           "--overlap-prefill", "--max-tokens", "8", "--ignore-eos", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0 and ours.returncode == 0, ours.stderr
    tokens = lambda out: [c["token_ids"] for c in json.loads(out.stdout)["completions"]]  # noqa: E731
    assert tokens(ours) == tokens(ref)
    refused = subprocess.run([sys.executable, "-m", "ferry.cli", "generate", "x", "--device", "cpu",
                              "--overlap-prefill"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs --tp 2 or more" in refused.stderr


@pytest.mark.slow
def test_tp_speed_benchmark_runs_tp1_and_tp2_and_reports_scaling_and_roofline():
    from ferry.bench.shapes import TINY
    from ferry.bench.tp_speed import SpeedJob, run_tp_speed

    job = SpeedJob(TINY, "float32", batches=(1,), prompt_len=16, new_tokens=8, repeats=1, prefill=(2, 16))
    results = run_tp_speed(job, [1, 2], "cpu")
    decode = {res["tp"]: next(r for r in res["rows"] if r["test"] == "decode") for res in results}
    prefill = next(r for r in results[1]["rows"] if r["test"] == "prefill")
    assert decode[1]["vs_tp1"] == 1.0 and decode[2]["vs_tp1"] > 0
    assert decode[2]["allreduce_us"] > 0 and 0 < decode[2]["of_roofline"]
    assert prefill["prefill_ms"] > 0 and prefill["prefill_overlap_ms"] > 0
    assert results[1]["allreduce_calls"]["host_shm"] > 0  # CPU ranks of one host sum through shared memory
