"""``headatlas report`` and ``serve``: the self-contained HTML report and the local live viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, app, console, err_console, example, fail, quiet_libraries, run


@app.command(epilog=example("headatlas report atlas", "headatlas report atlas --out atlas.html --no-figures"))
def report(
    directory: Annotated[Path, typer.Argument(help="atlas directory written by `headatlas scan`")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default DIR/report.html)")] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="also draw DIR/figures/")] = True,
) -> None:
    """Write a self-contained HTML report (one file, works offline) and DIR/figures/."""
    from ..atlas.table import Atlas
    from ..core.outputs import check_output_dir, check_output_file
    from ..report.html import REPORT_FILE, write_report

    atlas = run(lambda: Atlas.load(directory))
    run(lambda: check_output_file(out or directory / REPORT_FILE, (".html", ".htm")))
    if figures:
        run(lambda: check_output_dir(directory / "figures", "directory"))
    with console.status("writing the report …"):
        path = run(lambda: write_report(atlas, directory, out, figures=figures))
    size = path.stat().st_size
    extra = f" and {directory / 'figures'}/" if figures else ""
    console.print(f"wrote {path} ({size / 1e6:.2f} MB){extra}", highlight=False)


@app.command(
    epilog=example(
        "headatlas serve atlas", "headatlas serve default --port 9000", "headatlas serve atlas --no-live"
    )
)
def serve(
    target: Annotated[
        str, typer.Argument(help="an atlas dir, or a model ('default', 'minilm', a dir, a .gguf, a hub id)")
    ] = "default",
    host: Annotated[
        str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8765,
    model: Annotated[
        str | None,
        typer.Option(help="model for live attention (default: the one the atlas was scanned from)"),
    ] = None,
    live: Annotated[
        bool,
        typer.Option("--live/--no-live", help="load a model for live attention (--no-live: the atlas only)"),
    ] = True,
    max_tokens: Annotated[int, typer.Option(help="longest text a request may send")] = 512,
    device: DeviceOpt = "cpu",
) -> None:
    """Start the local web viewer: type text, see any head's attention live, compare two heads."""
    from ..serve import check_port, create_app, resolve_target
    from ..serve import run as serve_app

    if not 0 < port < 65536:
        fail(f"--port {port} is not a port: use 1..65535")
    if max_tokens < 2:
        fail("--max-tokens must be at least 2")
    run(lambda: check_port(host, port))
    atlas, spec = run(lambda: resolve_target(target, model))
    if not live:
        if atlas is None:
            fail("--no-live needs an atlas dir to serve")
        spec = None
    loaded = None
    if spec is not None:
        quiet_libraries(False)
        from ..core.errors import HeadatlasError
        from ..model.load import load

        with console.status(f"loading {spec} …"):
            try:
                loaded = load(spec, device=device)
            except HeadatlasError as exc:
                if atlas is None or model is not None:
                    fail(exc.render())
                err_console.print(
                    f"warning: {exc} — serving the atlas without live attention", style="yellow"
                )
    elif live:
        err_console.print(
            "warning: the atlas does not name a model it can reload: pass --model for live attention",
            style="yellow",
        )
    app_ = run(lambda: create_app(atlas, loaded, max_tokens=max_tokens, hosts=(host,)))
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(
            f"warning: binding {host}: anyone who can reach this machine can use the viewer", style="yellow"
        )
    url_host = f"[{host}]" if ":" in host else host
    console.print(f"headatlas viewer on http://{url_host}:{port}  (Ctrl-C stops it)", highlight=False)
    serve_app(app_, host=host, port=port)
