"""Nothing lost: every command checks its output before any work (one mechanism,
``headatlas.core.outputs``), never writes into an atlas or a model directory it did not make, and
``--force`` writes beside a user's files without removing them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.cli import app
from headatlas.core.outputs import Folder, check_output_file, check_output_folder, output_folder
from headatlas.core.storage import LOCK_FILE, directory_lock

runner = CliRunner()


@pytest.fixture(scope="module")
def steering_dir(tiny_loaded: ha.LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("steer") / "steer"
    ha.steer.fit(tiny_loaded, task="truth", k=2).save(out)
    return out


@pytest.fixture(scope="module")
def plan_file(tiny_atlas_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    ha.kv.plan(atlas, keep_fraction=0.5, by="first_token", sink=2, recent=30, context=200).save(out)
    return out


# Every command that writes a folder of its own: its arguments given the --out to try.
FOLDER_COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "prune": lambda f, out: ["prune", str(f["model"]), "--heads", "L0H0", "--out", str(out)],
    "prune-curve": lambda f, out: ["prune-curve", str(f["model"]), "--out", str(out)],
    "steer fit": lambda f, out: ["steer", "fit", str(f["model"]), "--out", str(out)],
    "steer export": lambda f, out: [
        "steer",
        "export",
        str(f["steer"]),
        "--model",
        str(f["model"]),
        "--out",
        str(out),
    ],
    "guard fit": lambda f, out: ["guard", "fit", str(f["model"]), "--out", str(out)],
    "guard eval": lambda f, out: [
        "guard",
        "eval",
        str(f["model"]),
        "--guard",
        "g",
        "--jsonl",
        "rows.jsonl",
        "--out",
        str(out),
    ],
    "compare": lambda f, out: ["compare", str(f["atlas"]), str(f["atlas"]), "--out", str(out)],
    "export duo": lambda f, out: [
        "export",
        str(f["atlas"]),
        "--format",
        "duo",
        "--score",
        "first_token",
        "--out",
        str(out),
    ],
    "kv export": lambda f, out: ["kv", "export", str(f["plan"]), "--format", "duo", "--out", str(out)],
}

# Every command that writes one JSON file: its arguments given the --out (or --json) to try.
FILE_COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "kv plan": lambda f, out: ["kv", "plan", str(f["atlas"]), "--out", str(out)],
    "kv fit": lambda f, out: ["kv", "fit", str(f["model"]), "--out", str(out)],
    "kv eval": lambda f, out: ["kv", "eval", str(f["model"]), "--plan", str(f["plan"]), "--json", str(out)],
    "conflict": lambda f, out: ["conflict", str(f["model"]), "--out", str(out)],
    "safety": lambda f, out: ["safety", str(f["model"]), "--out", str(out)],
    "export": lambda f, out: [
        "export",
        str(f["atlas"]),
        "--format",
        "retrieval-head",
        "--score",
        "first_token",
        "--out",
        str(out),
    ],
}


@pytest.fixture
def inputs(
    tiny_model_dir: Path, tiny_atlas_dir: Path, steering_dir: Path, plan_file: Path
) -> dict[str, Path]:
    return {"model": tiny_model_dir, "atlas": tiny_atlas_dir, "steer": steering_dir, "plan": plan_file}


def _targets(tmp_path: Path, tiny_model_dir: Path, tiny_atlas_dir: Path) -> dict[str, tuple[Path, str]]:
    """Places no folder-writing command may write, with the message that refuses each."""
    atlas = tmp_path / "an-atlas"
    shutil.copytree(tiny_atlas_dir, atlas)
    model = tmp_path / "a-model"
    shutil.copytree(tiny_model_dir, model)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"the user's")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's")
    return {
        "atlas": (atlas, "holds an atlas"),
        "model": (model, "holds a model"),
        "foreign": (photos, "holds nothing"),
        "file": (a_file, "is a file"),
    }


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", sorted(FOLDER_COMMANDS))
def test_folder_outputs_are_checked_before_any_work(
    command: str, inputs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, tiny_atlas_dir: Path
) -> None:
    for kind, (target, message) in _targets(tmp_path, tiny_model_dir, tiny_atlas_dir).items():
        before = _snapshot(target)
        result = runner.invoke(app, FOLDER_COMMANDS[command](inputs, target), env={"COLUMNS": "200"})
        assert result.exit_code == 2 and message in result.output, (command, kind, result.output)
        assert "Traceback" not in result.output
        assert _snapshot(target) == before, (command, kind)  # nothing written, nothing removed


@pytest.mark.parametrize("command", sorted(FILE_COMMANDS))
def test_file_outputs_never_replace_an_atlas_file_or_another_commands_json(
    command: str, inputs: dict[str, Path], tmp_path: Path, tiny_atlas_dir: Path
) -> None:
    atlas = tmp_path / "an-atlas"
    shutil.copytree(tiny_atlas_dir, atlas)
    theirs = tmp_path / "settings.json"
    theirs.write_text('{"theirs": true}')
    for target, message in ((atlas / "atlas.json", "is an atlas file"), (atlas, "is a directory")):
        before = _snapshot(atlas)
        result = runner.invoke(app, FILE_COMMANDS[command](inputs, target), env={"COLUMNS": "200"})
        assert result.exit_code == 2 and message in result.output, (command, result.output)
        assert _snapshot(atlas) == before
    if command != "export":  # a foreign format's JSON carries no headatlas format to recognise
        result = runner.invoke(app, FILE_COMMANDS[command](inputs, theirs), env={"COLUMNS": "200"})
        assert result.exit_code == 2 and "--force" in result.output, (command, result.output)
        assert theirs.read_text() == '{"theirs": true}'


def test_force_writes_beside_a_users_files_and_never_removes_them(tmp_path: Path) -> None:
    folder = Folder("a command", "marker.json")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"the user's")
    (photos / "result.txt").write_text("old")
    with pytest.raises(ha.HeadatlasError, match=r"pass force=True"):
        check_output_folder(photos, folder)
    assert check_output_folder(photos, folder, force=True) is False  # written beside, not replaced
    with output_folder(photos, folder) as tmp:
        (tmp / "marker.json").write_text("{}")
        (tmp / "result.txt").write_text("new")
    assert (photos / "cat.jpg").read_bytes() == b"the user's" and (photos / "result.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging folder left
    assert check_output_folder(photos, folder) is True  # now the command's own: replaced whole
    with output_folder(photos, folder) as tmp:
        (tmp / "marker.json").write_text("{}")
    assert sorted(p.name for p in photos.iterdir()) == ["marker.json"]


def test_a_failed_run_leaves_no_empty_directory_with_a_lock(tmp_path: Path) -> None:
    out = tmp_path / "new" / "atlas"
    with pytest.raises(RuntimeError), directory_lock(out):
        assert (out / LOCK_FILE).exists()
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with directory_lock(kept):
        (kept / "result.json").write_text("{}")
    assert (kept / "result.json").exists()


def test_a_failed_import_leaves_no_atlas_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"99-0": [1.0]}))
    out = tmp_path / "atlas"
    result = runner.invoke(
        app,
        ["import", str(bad), "--format", "retrieval-head", "--model", str(tiny_model_dir), "--out", str(out)],
    )
    assert result.exit_code == 2 and not out.exists(), result.output


def test_an_import_never_replaces_a_measured_score(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    before = atlas.matrix("previous_token").copy()
    scores = tmp_path / "scores.csv"
    scores.write_text("layer,head,score\n0,0,0.5\n")
    from headatlas.apps.interop.exchange import import_annotation

    with pytest.raises(ha.HeadatlasError, match="already a column"):
        import_annotation(atlas, scores, "csv", name="previous_token")
    assert (atlas.matrix("previous_token") == before).all()
    assert import_annotation(atlas, scores, "csv", name="mine") == "mine"
    scores.write_text("layer,head,score\n0,0,0.7\n")
    import_annotation(atlas, scores, "csv", name="mine")  # its own imported column: replaced
    assert atlas.matrix("mine")[0, 0] == pytest.approx(0.7)
    scores.write_text("layer,head,score\n0,0,0.5\n0,0,0.6\n")
    with pytest.raises(ha.HeadatlasError, match="more than once"):
        import_annotation(atlas, scores, "csv", name="twice")
    scores.write_text("layer,head,score\n0,0,abc\n")
    with pytest.raises(ha.HeadatlasError, match="not numbers"):
        import_annotation(atlas, scores, "csv", name="letters")


def test_check_output_file_keeps_its_own_json_replaceable(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "headatlas-kv-plan"}))
    check_output_file(plan, (".json",), kind="headatlas-kv-plan")  # its own: replaced
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ha.HeadatlasError, match="model's config"):
        check_output_file(tmp_path / "config.json", (".json",), force=True)
