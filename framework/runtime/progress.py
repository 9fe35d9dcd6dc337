"""A progress bar with ETA on the main rank only; other ranks get a silent stand-in."""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Silent:
    def update(self, n=1, **postfix):
        pass

    def close(self):
        pass


class _Bar:
    def __init__(self, total, desc):
        self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def update(self, n=1, **postfix):
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def close(self):
        self._bar.close()


def progress(total: int, desc: str, enabled: bool = True):
    return _Bar(total, desc) if enabled else _Silent()
