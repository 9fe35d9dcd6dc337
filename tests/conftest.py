import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A directory with a 512-token byte-level BPE tokenizer (<s>=0, </s>=1, <pad>=2); see tokenizer_fixture."""
    from tests.tokenizer_fixture import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=512)
