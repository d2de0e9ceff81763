"""Runnable examples for lightning_bigmodel (importable from the repository root)."""
