import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The authors' key lists and the raw-format checkpoint with their outputs (copies of ../shared/reference/).
REFERENCE_DIR = Path(os.environ.get("VIL_REFERENCE_DIR", Path(__file__).resolve().parent / "fixtures"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "vil2_mini_raw.pt").is_file():
        message = f"reference fixtures not found in {REFERENCE_DIR} (set VIL_REFERENCE_DIR)"
        if os.environ.get("CI"):  # CI must run the checkpoint tests, never skip them
            pytest.fail(message)
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
