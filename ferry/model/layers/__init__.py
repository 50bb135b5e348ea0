"""Building blocks that know how to shard themselves over a ParallelGroup and load their own slice."""
