"""Side-by-side benchmarks: plain PyTorch, accelerate and lightning_bigmodel (run ``python -m benchmarks.run``)."""
