"""Shared test set-up: Triton runs in its CPU interpreter unless a GPU is there, seeds are fixed."""
import os

import pytest

try:  # TRITON_INTERPRET must be set before triton is first imported
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
REFERENCE_DIR = os.path.abspath(os.path.join(SHARED, "reference"))
DATA_FILE = os.path.abspath(os.path.join(SHARED, "data", "code_alpaca_2k.json"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """The device a `gpu`-marked test runs on; skips when no GPU is there."""
    if not _HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def real_checkpoint(name):
    """Path of a real pretrained checkpoint built by shared/tools/make_real_checkpoints.sh, or skip."""
    root = os.environ.get("MINILORA_REAL_CKPTS")
    if not root:
        pytest.skip("MINILORA_REAL_CKPTS is not set (build with ../shared/tools/make_real_checkpoints.sh DIR)")
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"real checkpoint {path} is absent")
    return path
