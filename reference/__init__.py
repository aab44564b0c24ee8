"""PyTorch references the tests and benchmarks compare against, written from the official code and from diffusers',
transformers' and mmsegmentation's own classes (never from ours)."""
