import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# megatron compiles a few fused activations with torch.compile (squared ReLU, ...). Inductor's kernels are
# cached on disk, by default in /tmp/torchinductor_$USER, shared by every process of the machine and kept
# between runs; a kernel generated under another CPU's vector width (another machine, or ATEN_CPU_CAPABILITY
# set while emulating one) then overruns its buffers here. Each test session compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mft-tests-inductor-")

    def pytest_sessionfinish(session, exitstatus):
        import shutil

        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A directory with a 512-token byte-level BPE tokenizer (<s>=0, </s>=1, <pad>=2); see tokenizer_fixture."""
    from tests.tokenizer_fixture import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=512)
