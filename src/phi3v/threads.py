"""CPU threads of the long commands (``--threads``): how many torch may use, chosen once at the start and logged.

torch's default is the machine's physical core count, whatever share of it this process may actually run on; on a
shared machine (a container limited to 2 cores of 64, `taskset`, several jobs at once) its threads then wait for each
other and a training step can take several times longer than with one thread. The default here is the number of cores
this process may run on (`os.sched_getaffinity`), or ``OMP_NUM_THREADS`` when set (``torchrun`` sets it to 1 per
process); ``--threads N`` chooses.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (``taskset``, cgroup cpusets), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def parse_thread_count(text: str) -> int:
    """A ``--threads`` value: a whole number >= 1 (ValueError naming the value otherwise)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"--threads takes a whole number of CPU threads >= 1, got {text!r}") from None
    if value < 1:
        raise ValueError(f"--threads takes a whole number of CPU threads >= 1, got {value}")
    return value


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """The thread count to use and where it came from (``--threads``, ``OMP_NUM_THREADS`` or the affinity).

    Raises:
        ValueError: ``requested`` below 1, or an ``OMP_NUM_THREADS`` that is not a whole number >= 1.
    """
    if requested is not None:
        return parse_thread_count(str(requested)), "--threads"
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            return parse_thread_count(env), THREADS_ENV
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={env!r} is not a whole number >= 1; unset it or pass --threads") from None
    return usable_cores(), "the default"


def set_threads(requested: int | None = None) -> int:
    """Choose the thread count (`choose_threads`), apply it with `torch.set_num_threads` and log it.

    More threads than usable cores is allowed (with a warning: they compete for the same cores).

    Returns:
        The thread count now in use.
    """
    import torch

    count, source = choose_threads(requested)
    cores = usable_cores()
    torch.set_num_threads(count)
    detail = "" if source == "the default" else f", from {source}"
    logger.info(
        "using %d CPU thread%s (of %d core%s this process may use%s)",
        count,
        "s" if count != 1 else "",
        cores,
        "s" if cores != 1 else "",
        detail,
    )
    if count > cores:
        logger.warning(
            "%d CPU threads for %d usable cores: the threads will take turns on the same cores, which is usually "
            "slower than --threads %d",
            count,
            cores,
            cores,
        )
    return count
