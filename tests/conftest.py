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

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
REFERENCE_DIR = os.path.join(ROOT, "docs", "reference")  # configs and facts of the supported models


def _load_regen():
    """scripts/regenerate_expected_loss.py as a module: the tiny training recipe several test files share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("regen", os.path.join(ROOT, "scripts", "regenerate_expected_loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regen = _load_regen()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny matmuls
    gain nothing from two, on a shared 2-core machine a second thread waiting for a busy core made the same
    steps up to 20x slower, and subprocesses run with OMP_NUM_THREADS=1 give the same float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(base model dir, data file) of the expected-loss recipe: a 2-layer tiny Llama (tied embeddings), 16 rows."""
    return regen.write_inputs(str(tmp_path_factory.mktemp("inputs")))


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
    """Path of a real pretrained checkpoint DIR/<name> (a Hugging Face checkpoint directory; README "Tests"
    says how to download them), or skip."""
    root = os.environ.get("MINILORA_REAL_CKPTS")
    if not root:
        pytest.skip("needs real checkpoints: set MINILORA_REAL_CKPTS=DIR holding smollm2-135m-instruct/, "
                    "gemma3-270m/, qwen2.5-coder-0.5b-instruct/ (README, \"Tests\")")
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"real checkpoint {path} is absent (README, \"Tests\", says how to download it)")
    return path


def codealpaca_2k():
    """Path of the CodeAlpaca 2k sample (data/code_alpaca_2k.json of github.com/sahil280114/codealpaca, 2,017
    rows), or skip. Its licence allows research use only, so the repository does not carry it."""
    path = os.environ.get("MINILORA_CODEALPACA_2K")
    if not path:
        pytest.skip("needs the CodeAlpaca 2k sample: set MINILORA_CODEALPACA_2K=FILE (README, \"Tests\")")
    if not os.path.isfile(path):
        pytest.skip(f"MINILORA_CODEALPACA_2K={path}: no such file")
    return path
