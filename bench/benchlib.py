"""What the benchmark scripts share: process memory readings, machine facts, quiet libraries.

Standard library only, so the TransformerLens script (``tl_detect.py``, run in its own venv) can
import it too; each script runs from ``bench/``, where this module sits.
"""

from __future__ import annotations

import os
import platform
import resource
import sys


def quiet() -> None:
    """Silence transformers' logging and progress bars (and headatlas' info logs)."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("headatlas").setLevel(logging.WARNING)


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / (1024 * 1024)


def status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    """Current resident set size (``VmRSS``), MiB, or None off Linux."""
    return status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5); return whether it worked.

    Loading a model briefly holds more memory than it keeps (the checkpoint and the initialised
    weights at once), and that transient would otherwise hide the run's own peak in ``ru_maxrss``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_since_reset_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``); ``ru_maxrss`` off Linux.

    ``ru_maxrss`` alone cannot be reset: the kernel folds the high-water mark into it whenever a
    thread exits, so after a reset it may still report the loading peak.
    """
    hwm = status_mib("VmHWM")
    return maxrss_mib() if hwm is None else hwm


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def strict_json(value: object, **kwargs: object) -> str:
    """``value`` as strict JSON text: NaN and ±inf (a rate with no denominator) become ``null``."""
    import json
    import math

    def clean(item: object) -> object:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(inner) for inner in item]
        return item

    return json.dumps(clean(value), allow_nan=False, **kwargs)  # type: ignore[arg-type]
