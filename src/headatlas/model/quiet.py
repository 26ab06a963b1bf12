"""Keep third-party output out of the library's: transformers' and huggingface_hub's progress bars
and warnings while a model loads or converts, restored afterwards.

The library reports through :mod:`logging` (silent by default); the CLI draws its own ``rich``
progress. transformers' per-load bars ("Loading weights", "Writing model shards", the GGUF
de-quantisation bar, a raw ``tqdm`` that ignores transformers' own switch) would otherwise land in a
user's notebook or log on every :func:`headatlas.load`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _without_gguf_progress_bar() -> Iterator[None]:
    """Silence transformers' GGUF de-quantisation bar (a raw tqdm that ignores its logging settings)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing to silence
        yield
        return
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: no transformers / huggingface_hub progress bars, transformers' logging at
    ERROR and Python warnings from them ignored; the caller's settings are restored on exit (also on
    an exception). Yields nothing."""
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), _without_gguf_progress_bar():
            for module in ("transformers", "huggingface_hub", "accelerate", "torch"):
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not hub_bars_off:
            hub_utils.enable_progress_bars()
        if bars_on:
            hf_logging.enable_progress_bar()
