import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REFERENCE_DIR = Path(os.environ.get("VIL_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "vil2_mini_raw.pt").is_file():
        pytest.skip(f"reference fixtures not found in {REFERENCE_DIR} (set VIL_REFERENCE_DIR)")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
