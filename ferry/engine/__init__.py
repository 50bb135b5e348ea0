"""Requests in, tokens out: sampling, KV cache, CUDA-graph decode and the step loop."""
