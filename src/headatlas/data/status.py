"""What is installed: every packaged model and dataset, with the command that installs what is missing."""

from __future__ import annotations

from ..core.errors import HeadatlasError
from ..core.storage import cache_dir
from ..model.packaged import PACKAGED_MODELS, packaged_model_path
from .ud import DATA_HINT, ud_dir, ud_installed


def status() -> dict[str, str]:
    """Return, for each packaged item, ``installed at PATH`` or ``missing: how to install``.

    A GGUF model already converted to the fp32 cache also says ``, converted in DIR``.
    """
    result: dict[str, str] = {}
    for entry in PACKAGED_MODELS.values():
        key = f"{entry.name} model ({entry.display_name})"
        try:
            state = f"installed at {packaged_model_path(entry.name)}"
        except HeadatlasError:
            result[key] = f"missing: {entry.install_hint}"
            continue
        if entry.cache_name is not None:
            cached = cache_dir() / "models" / entry.cache_name
            if (cached / "headatlas-source.json").is_file():
                state += f", converted in {cached}"
        result[key] = state
    ewt_dir = ud_dir()
    if ud_installed(ewt_dir):
        result["UD English EWT"] = f"installed at {ewt_dir}"
    else:
        result["UD English EWT"] = f"missing: {DATA_HINT}"
    return result
