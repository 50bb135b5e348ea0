"""Which physical KV blocks each sequence holds: allocation, reference counts, and the prefix cache.

The cache is a pool of fixed-size blocks (paged_cache.py); a sequence owns a block table, the list of its blocks
in order. Full blocks are named by a hash of every token up to their end (the parent block's hash and their own
tokens), so two sequences that start with the same tokens map their common full blocks to the same physical
blocks (reference counted) and the second one prefills only what differs. Where they part inside a block, the
newcomer gets a private copy of that block (copy on write) and computes from the first differing token on; a
sequence only ever writes into its own last, private block. A block whose last user finished keeps its contents
and its hash as long as nobody needs the space: free blocks are handed out least recently used first, so a
popular system prompt stays cached.

Block 0 is never handed out: padding rows of a captured decode step write their K/V there.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

NULL_BLOCK = 0


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


@dataclass
class BlockTable:
    """One sequence's blocks, and how many of its leading full blocks are registered in the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hash of blocks[i] for each registered full block

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class PrefixHit:
    """What the prefix cache can give a new sequence: shared full blocks, then maybe a partial block to copy."""

    blocks: tuple[int, ...]  # full blocks to share, in order
    hashes: tuple[int, ...]
    copy_from: int | None  # a cached block whose first `copy_tokens` tokens match what follows
    copy_tokens: int

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.copy_tokens


@dataclass
class BlockStats:
    allocated: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache instead of a prefill
    copied_blocks: int = 0  # copy-on-write copies of a partly shared block
    evicted: int = 0  # cached blocks whose contents were dropped to make room


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the padding block)")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))  # never used or holding nothing worth keeping
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free but still holding a hashed block, LRU first
        self._by_hash: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (for partial matches)
        self._parent_of: dict[int, int | None] = {}  # block -> the hash of the block before it
        self._children: dict[int | None, list[int]] = {}  # parent hash -> cached blocks that follow it
        self.stats = BlockStats()

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now (evicting cached contents if needed)."""
        return len(self._free) + len(self._cached_free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- prefix cache -----------------------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> PrefixHit:
        """The longest cached prefix of `token_ids`, leaving at least its last token to compute (its logits give
        the next token)."""
        if not self.prefix_caching:
            return PrefixHit((), (), None, 0)
        bs, limit = self.block_size, len(token_ids) - 1
        blocks, hashes, parent = [], [], None
        while (len(blocks) + 1) * bs <= limit:
            start = len(blocks) * bs
            h = block_hash(parent, tuple(token_ids[start : start + bs]))
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        # Copy on write: a cached block that continues this prefix and agrees on some leading tokens.
        start = len(blocks) * bs
        rest = token_ids[start : min(start + bs, limit)]
        best, best_len = None, 0
        for child in self._children.get(parent, ()):
            cached = self._tokens_of[child]
            n = 0
            while n < len(rest) and cached[n] == rest[n]:
                n += 1
            if n > best_len:
                best, best_len = child, n
        return PrefixHit(tuple(blocks), tuple(hashes), best, best_len)

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], computed: int) -> None:
        """Name every full block of `table` whose K/V has been computed (`computed` tokens) so others can share it."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (len(table.hashes) + 1) * bs <= computed:
            i = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else None
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            table.hashes.append(h)
            block = table.blocks[i]
            if h in self._by_hash or block in self._hash_of:
                continue  # the same contents are cached already (or this block is a shared one)
            self._by_hash[h], self._hash_of[block], self._tokens_of[block] = block, h, tokens
            self._parent_of[block] = parent
            self._children.setdefault(parent, []).append(block)

    # -- allocation -------------------------------------------------------------------------------------------

    def allocate_with_prefix(self, table: BlockTable, hit: PrefixHit) -> int | None:
        """Take the shared blocks of `hit` and, for a partial match, a fresh block to copy into. Returns the block
        to copy from when a copy is needed (the caller copies `hit.copy_from` into `table.blocks[-1]`)."""
        for block, h in zip(hit.blocks, hit.hashes, strict=True):
            if self.ref_counts[block] == 0:
                self._cached_free.pop(block, None)
            self.ref_counts[block] += 1
            table.blocks.append(block)
            table.hashes.append(h)
        self.stats.prefix_hit_tokens += hit.tokens(self.block_size)
        if hit.copy_from is None:
            return None
        # Pin the source while the fresh block is taken, so the eviction that may make room does not pick it.
        self.ref_counts[hit.copy_from] += 1
        self._cached_free.pop(hit.copy_from, None)
        table.blocks.append(self._take())
        self._release(hit.copy_from)
        self.stats.copied_blocks += 1
        return hit.copy_from

    def ensure_slots(self, table: BlockTable, tokens: int) -> bool:
        """Grow `table` to hold `tokens` tokens; False (and nothing taken) when the pool is short."""
        needed = self.blocks_for(tokens) - len(table.blocks)
        if needed <= 0:
            return True
        if needed > self.free_blocks:
            return False
        for _ in range(needed):
            table.blocks.append(self._take())
        return True

    def truncate(self, table: BlockTable, tokens: int) -> None:
        """Keep only the blocks holding the first `tokens` tokens and give back the rest: a rolled-back tail
        (rejected speculative tokens). Later writes overwrite the last kept block's tail, so a table doing this
        must not share that block (the edge's cloud pool runs without prefix caching)."""
        keep = self.blocks_for(tokens)
        while len(table.blocks) > keep:
            self._release(table.blocks.pop())
        del table.hashes[tokens // self.block_size :]  # a registered block cut short no longer holds its hash

    def free(self, table: BlockTable) -> None:
        """Give back every block of `table` (shared blocks only lose one user); the table is emptied."""
        for block in reversed(table.blocks):  # the tail is the least likely to be shared: evicted first
            self._release(block)
        table.blocks.clear()
        table.hashes.clear()

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached_free.popitem(last=False)  # least recently used cached block
            self._forget(block)
            self.stats.evicted += 1
        self.ref_counts[block] = 1
        self.stats.allocated += 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            if block in self._hash_of:
                self._cached_free[block] = None
            else:
                self._free.append(block)

    def _forget(self, block: int) -> None:
        del self._by_hash[self._hash_of.pop(block)], self._tokens_of[block]
        parent = self._parent_of.pop(block)
        children = self._children[parent]
        children.remove(block)
        if not children:
            del self._children[parent]

    def check_no_leaks(self) -> None:
        """Every block is free (for tests and at shutdown): no sequence holds one, none was lost."""
        held = [b for b in range(1, self.num_blocks) if self.ref_counts[b]]
        if held or self.free_blocks != self.usable_blocks:
            raise AssertionError(f"KV blocks leaked: {len(held)} still referenced ({held[:8]}...), "
                                 f"{self.free_blocks} of {self.usable_blocks} free")
