# Repository-root conftest: makes `examples` and `benchmarks` importable in tests.
