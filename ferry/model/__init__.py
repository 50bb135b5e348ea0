"""Llama-family models built from parallel layers, and their weight loading."""
