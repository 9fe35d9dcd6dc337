"""Helpers of the job tests that watch a job from outside: its log messages, and a kill at a chosen moment."""

import logging
import multiprocessing as mp
import os
import time

from launch.spawn import end_group


def capture_messages(logger_name: str, level: int | None = None) -> list[str]:
    """A list that receives every message of ``logger_name`` from now on (``level``: lower the logger's
    threshold to it, e.g. INFO under setup_logging("WARNING"))."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    if level is not None:
        logger.setLevel(level)
    logger.addHandler(handler)
    return messages


def _own_group(target, args):
    os.setpgid(0, 0)  # so the kill below reaches the processes the job started too
    target(*args)


def kill_when_blocked(target, args, marker, what: str, timeout: float = 200) -> None:
    """Run ``target(*args)`` in a spawned process until it writes the file ``marker`` (and then blocks), then
    SIGKILL it and everything it started: a crash at exactly that point. ``what`` names the point in the
    failure messages."""
    child = mp.get_context("spawn").Process(target=_own_group, args=(target, args))
    child.start()
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker):
            assert child.is_alive(), f"the job exited ({child.exitcode}) before {what}"
            assert time.monotonic() < deadline, f"the job did not reach {what}"
            time.sleep(0.2)
    finally:
        end_group(child)
