"""Shared test helpers: where the nanochat fixtures live, and tiny checkpoints of our own."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Hermetic by default: no test may find the user's nanochat or build the 5-minute demo.
# Tests that want other values set them with monkeypatch.
_HOME = Path(tempfile.mkdtemp(prefix="nanochat-atlas-tests-"))
os.environ["NANOCHAT_BASE_DIR"] = str(_HOME / "no_nanochat")
os.environ["NANOCHAT_ATLAS_CACHE"] = str(_HOME / "cache")
os.environ["NANOCHAT_ATLAS_DEMO"] = "tiny"

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
D4 = FIXTURES / "nanochat_d4"


def require_fixture(path: Path = D4) -> Path:
    if not path.exists():
        pytest.skip(f"nanochat fixtures not found at {path} (they sit beside the checkout "
                    f"as ../shared/fixtures)")
    return path


@pytest.fixture
def d4_dir() -> Path:
    return require_fixture(D4)


@pytest.fixture
def d4_reference():
    return torch.load(require_fixture(D4) / "reference.pt")
