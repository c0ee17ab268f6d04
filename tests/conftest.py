import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every pass's output is verified in tests; Inductor's cache lives in the checkout so reruns are warm.
os.environ.setdefault("ZB_VERIFY", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
sys.path.insert(0, str(ROOT))  # examples/ and tests/ import as packages

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Many tests compile the same model classes; a fresh Dynamo keeps each one's compile independent.
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
