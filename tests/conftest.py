"""Shared test helpers: where the nanochat fixtures live, and tiny checkpoints of our own."""

from pathlib import Path

import pytest
import torch

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
