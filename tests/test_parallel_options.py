"""The rank count and the options tied to it are checked once, before any model loads: the same refusals
for `LLM(...)` as for the CLI (tests/test_cli.py covers the command's one-line errors)."""

from __future__ import annotations

import pytest

from ferry.api import LLM
from ferry.errors import FerryError
from ferry.parallel.layout import check_parallel_options


@pytest.mark.parametrize("tp", [0, -1])
def test_llm_refuses_a_rank_count_below_one(tp):
    with pytest.raises(FerryError, match=f"--tp must be 1 or more .*got {tp}"):
        LLM("/no/such/model.gguf", device="cpu", tp=tp)  # refused before the (missing) model is opened


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(allreduce="symm_one_shot"), "--allreduce symm_one_shot picks the tensor-parallel all-reduce path"),
        (dict(compressed_allreduce="int8"), "--compressed-allreduce compresses tensor-parallel all-reduces"),
    ],
)
def test_llm_on_one_rank_refuses_all_reduce_options_instead_of_dropping_them(options, message):
    with pytest.raises(FerryError, match=message):
        LLM("/no/such/model.gguf", device="cpu", tp=1, **options)


def test_parallel_options_that_fit_the_rank_count_pass():
    check_parallel_options(1, weights="int8", offload_fraction=0.5)
    check_parallel_options(1, allreduce="auto")
    check_parallel_options(2, compression="int8", allreduce="process_group")


def test_single_rank_options_are_refused_with_several_ranks():
    with pytest.raises(FerryError, match="single-rank options"):
        check_parallel_options(2, weights="int8")
    with pytest.raises(FerryError, match="unknown --compressed-allreduce 'fp4'"):
        check_parallel_options(2, compression="fp4")
