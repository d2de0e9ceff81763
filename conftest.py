# Repository-root conftest: makes `examples` and `benchmarks` importable in tests, and keeps tests from
# leaving run artefacts in the repository itself (they belong in `tmp_path`).
from pathlib import Path

import pytest

_ROOT = Path(__file__).parent
_ARTEFACTS = ("device_map.json", "lightning_logs", "checkpoints")


@pytest.fixture(autouse=True)
def _no_artefacts_in_repo_root():
    before = {name for name in _ARTEFACTS if (_ROOT / name).exists()}
    yield
    created = [name for name in _ARTEFACTS if (_ROOT / name).exists() and name not in before]
    assert not created, f"the test wrote {created} into the repository root; use `tmp_path` / `default_root_dir`"
