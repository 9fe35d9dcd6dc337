"""Turn the errors a user can fix (config, layout, data, checkpoint) into one line on stderr and exit code 2."""

import contextlib
import sys


@contextlib.contextmanager
def exit_on_user_error():
    from framework.checkpoint.adapter import AdapterError
    from framework.checkpoint.hf_import import HFImportError
    from framework.models.layout import LayoutError
    from framework.runtime.errors import CheckpointError, ConfigError, DataError

    try:
        yield
    except (ConfigError, LayoutError, DataError, CheckpointError, HFImportError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
