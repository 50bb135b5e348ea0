"""The block allocator and prefix cache on their own: reference counts, LRU eviction, partial-block matches."""

from __future__ import annotations

import pytest

from ferry.engine.block_manager import NULL_BLOCK, BlockManager, BlockTable


def _filled(manager: BlockManager, tokens: list[int]) -> BlockTable:
    table = BlockTable()
    assert manager.ensure_slots(table, len(tokens))
    manager.register_full_blocks(table, tokens, len(tokens))
    return table


def test_blocks_are_handed_out_once_and_the_padding_block_never():
    m = BlockManager(num_blocks=5, block_size=4)
    table = BlockTable()
    assert m.ensure_slots(table, 16) and sorted(table.blocks) == [1, 2, 3, 4] and NULL_BLOCK not in table.blocks
    assert not m.ensure_slots(table, 17) and len(table) == 4  # short: nothing taken
    m.free(table)
    m.check_no_leaks()


def test_a_shared_block_stays_until_its_last_user_frees_it():
    m = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    first = _filled(m, tokens)
    hit = m.match_prefix(tokens)
    assert hit.blocks == tuple(first.blocks[:2]) and hit.copy_from is None  # the last token is left to compute
    second = BlockTable()
    m.allocate_with_prefix(second, hit)
    assert [m.ref_counts[b] for b in first.blocks[:2]] == [2, 2]
    m.free(first)
    assert [m.ref_counts[b] for b in second.blocks] == [1, 1]
    m.free(second)
    m.check_no_leaks()


def test_freed_cached_blocks_are_evicted_least_recently_used_first():
    m = BlockManager(num_blocks=5, block_size=2)
    old, new = _filled(m, [1, 2]), _filled(m, [3, 4])
    m.free(old)
    m.free(new)
    grab = BlockTable()
    assert m.ensure_slots(grab, 4)  # the two never-used blocks first, then no eviction yet
    assert m.stats.evicted == 0
    assert m.ensure_slots(grab, 6) and m.stats.evicted == 1
    assert m.match_prefix([1, 2, 9]).blocks == ()  # the older prefix went
    assert len(m.match_prefix([3, 4, 9]).blocks) == 1  # the newer one is still cached
    m.free(grab)
    m.check_no_leaks()


def test_a_prefix_that_parts_inside_a_block_is_offered_as_a_copy():
    m = BlockManager(num_blocks=8, block_size=4)
    table = _filled(m, [1, 2, 3, 4, 5, 6, 7, 8])
    hit = m.match_prefix([1, 2, 3, 4, 5, 6, 0, 0, 0])
    assert hit.blocks == (table.blocks[0],) and hit.copy_from == table.blocks[1] and hit.copy_tokens == 2
    other = BlockTable()
    assert m.allocate_with_prefix(other, hit) == table.blocks[1]
    assert other.blocks[0] == table.blocks[0] and other.blocks[1] not in table.blocks  # a private copy to write in
    m.free(table)
    m.free(other)
    m.check_no_leaks()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    m = BlockManager(num_blocks=8, block_size=4)
    table = _filled(m, list(range(8)))
    hit = m.match_prefix(list(range(8)))
    assert hit.tokens(4) == 7 and hit.copy_from == table.blocks[1]  # 4 shared + 3 copied; token 8 recomputed
    m.free(table)


def test_prefix_caching_off_matches_nothing():
    m = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    _filled(m, list(range(8)))
    assert m.match_prefix(list(range(9))).tokens(4) == 0


def test_a_leak_is_reported():
    m = BlockManager(num_blocks=4, block_size=4)
    m.ensure_slots(BlockTable(), 4)
    with pytest.raises(AssertionError, match="leaked"):
        m.check_no_leaks()


def test_truncate_gives_back_whole_blocks_past_the_new_end_and_keeps_the_rest():
    m = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    table = BlockTable()
    assert m.ensure_slots(table, 14)  # 4 blocks
    kept = table.blocks[:2]
    m.truncate(table, 5)  # tokens 0..4 live in blocks 0 and 1
    assert table.blocks == kept and m.free_blocks == 8 - 1 - 2
    m.truncate(table, 8)  # already short enough: nothing changes
    assert table.blocks == kept
    m.truncate(table, 0)
    assert table.blocks == []
    m.check_no_leaks()
