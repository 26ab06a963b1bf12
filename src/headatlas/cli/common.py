"""What every command shares: the app, consoles, errors, options, model loading and progress bars.

Library errors name Python parameters (``seq_len``); :func:`run` shows them as the flags the user
typed (``--seq-len``). Torch and transformers are imported only inside commands, so ``--help`` is
instant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from ..core.errors import HeadatlasError, flag

app = typer.Typer(
    help="Map every attention head of a transformer: what it attends to and what job it does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Packaged models and data: what is installed, and installing it.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"headatlas {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Map every attention head of a transformer: what it attends to and what job it does."""


console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, also in a pipe

T = TypeVar("T")

MODEL_HELP = (
    "a packaged model ('default', 'minilm', 'gemma3-270m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', "
    "'whisper-tiny-en'), a local HF model dir, a .gguf file, or a hub id Org/Name (from the hub online, "
    "from the Hugging Face cache offline)"
)
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP)]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per sequence")]
BatchSizeOpt = Annotated[int, typer.Option(help="sequences per forward pass")]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="run shards on Ray: 'auto' (RAY_ADDRESS, else a local instance with this machine's CPUs) "
        "or a cluster address",
    ),
]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray workers (default: one per CPU of the cluster)")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="split the model over this node's devices: auto, balanced, sequential, or a JSON "
        'file / object {module: device} ("disk" offloads to --offload-folder); replaces --device',
    ),
]
OffloadOpt = Annotated[Path | None, typer.Option(help='folder for layers a --device-map sends to "disk"')]
RevisionOpt = Annotated[
    str | None,
    typer.Option(help="hub ids only: the branch, tag or commit to load (default: main)"),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="run the Python code a hub model ships (off by default: only for models you trust)",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="write into a non-empty --out this command did not write (its other files stay; same-named files are replaced)",
    ),
]


def example(*commands: str) -> str:
    """Return a help epilog showing ``commands`` (every command's ``--help`` ends with one)."""
    lines = "\n\n".join(f"  {c}" for c in commands)
    return f"Example:\n\n{lines}"


def quiet_libraries(verbose: bool = False) -> None:
    """Route logging through rich on stderr and silence transformers' own progress and warnings."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr (one line) and exit with ``code``."""
    from rich.text import Text

    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


def run(action: Callable[[], T], flags: dict[str, str] | None = None) -> T:
    """Return ``action()``; a :class:`HeadatlasError` becomes a one-line error naming flags.

    Parameters the library names are shown as their flags (``seq_len`` → ``--seq-len``);
    ``flags`` maps the ones a command spells otherwise (e.g. ``n_prompts`` → ``--n-functional``).
    """
    try:
        return action()
    except HeadatlasError as exc:
        names = flags or {}
        fail(exc.render(lambda name: names.get(name) or flag(name)))


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold :func:`headatlas.core.storage.directory_lock` on ``directory``; a held lock is a one-line error."""
    from ..core.storage import directory_lock

    lock = directory_lock(directory)
    try:
        lock.__enter__()
    except HeadatlasError as exc:
        fail(exc.render())
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


@contextmanager
def ray_workers(spec: str, ray: str | None, workers: int | None, device: str = "cpu") -> Iterator[Any]:
    """Yield a :class:`headatlas.scanning.parallel.WorkerPool` for ``--ray`` (``None`` without it); errors are one line."""
    if ray is None:
        yield None
        return
    from ..scanning.parallel import worker_pool

    pool = worker_pool(spec, ray, workers, device)
    try:
        with console.status(f"starting {workers or 'one per CPU'} Ray workers …"):
            entered = pool.__enter__()
    except HeadatlasError as exc:
        fail(exc.render())
    try:
        yield entered
    finally:
        pool.__exit__(None, None, None)


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """Return ``--device-map`` as :func:`headatlas.load` takes it: a strategy name or a dict.

    ``text`` is ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``, a JSON object, or
    the path of a JSON file holding one. Anything else is a one-line error.
    """
    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    raw = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            fail(
                f"--device-map {text!r}: give one of {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON "
                "object or a JSON file"
            )
        raw = path.read_text(encoding="utf-8")
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"--device-map {text!r} is not valid JSON: {exc.msg} at line {exc.lineno}")
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        fail(f"--device-map {text!r}: the JSON must be an object {{module name: device}}")
    return mapping


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def scan_config(probes: str, **fields: Any) -> Any:
    """Return the :class:`~headatlas.scanning.config.ScanConfig` of ``--probes`` (comma-separated) and the
    other scan options, or exit with the one-line error of a bad value."""
    from ..scanning.config import ScanConfig

    names = [p.strip() for p in probes.split(",") if p.strip()]
    return run(lambda: ScanConfig.of(names, **fields))


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    offload_folder: Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load ``spec`` with :func:`headatlas.load` behind a spinner: the one way commands load a model.

    ``device_map`` is the ``--device-map`` text (:func:`parse_device_map`); ``revision`` and
    ``trust_remote_code`` go to :func:`headatlas.load` (hub ids).
    """
    from ..model.convert import needs_conversion

    placement = parse_device_map(device_map)

    what = (
        f"converting {spec} to safetensors once (about a minute)"
        if needs_conversion(spec)
        else f"loading {spec}"
    )
    with console.status(f"{what} …"):
        from ..model.load import load

        return run(
            lambda: load(
                spec,
                device=device,
                dtype=dtype,
                device_map=placement,
                offload_folder=offload_folder,
                revision=revision,
                trust_remote_code=trust_remote_code,
            )
        )


def describe_model(loaded: Any) -> None:
    """Print the one-line summary of a loaded model."""
    info = loaded.info
    if info.attn_kinds is not None:
        counts = ", ".join(f"{info.attn_kinds.count(k)} {k}" for k in ("encoder", "decoder", "cross"))
        console.print(
            f"[bold]{info.name}[/] ({info.arch}): encoder–decoder, {info.n_layers} attention layers "
            f"({counts}) × {info.n_heads} heads"
        )
        return
    console.print(
        f"[bold]{info.name}[/] ({info.arch}): {info.n_layers} layers × {info.n_heads} heads "
        f"({info.n_kv_heads} KV heads), {'causal' if info.causal else 'bidirectional'}"
    )


def progress_bar() -> Any:
    """A rich progress display on stderr (bar, done/total, elapsed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )


def step(progress: Any, description: str) -> Callable[[int, int], None]:
    """Return a ``(done, total)`` callback that drives a new task of ``progress``."""
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def labelled_steps(progress: Any) -> Callable[[str, int, int], None]:
    """Return a ``(label, done, total)`` callback that opens one task per label."""
    tasks: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done, total=total)

    return update


def floats(text: str, option: str) -> list[float]:
    """Parse the comma-separated finite numbers given to ``option`` (at least one)."""
    import math

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} {text!r}: give comma-separated numbers")
    if not values or not all(math.isfinite(v) for v in values):
        fail(f"{option} {text!r}: give one or more finite numbers, comma-separated")
    return values
