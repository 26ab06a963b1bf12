"""Hub ids as Hugging Face users expect: from the local Hugging Face cache offline (a tiny model in
the cache's own layout), ``revision=`` and ``trust_remote_code=`` passed through, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.cli import app
from tiny_models import BUILDERS, make_tokenizer

REPO = "tiny-org/tiny-llama"
COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


def _snapshot(cache: Path, commit: str, seed: int) -> Path:
    """Save the tiny Llama of ``seed`` as snapshot ``commit`` of :data:`REPO` in hub cache ``cache``:
    files in ``blobs/`` and symlinks under ``snapshots/<commit>/``, as ``huggingface_hub`` writes."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    staging = cache / f"staging-{seed}"
    BUILDERS["llama"](seed).save_pretrained(staging)
    make_tokenizer().save_pretrained(staging)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in staging.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    staging.rmdir()
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding :data:`REPO` at ``main`` (seed 0) and branch ``v2`` (seed 1),
    made the cache of this process, with offline mode on (huggingface_hub reads both at import)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    _snapshot(cache, COMMIT_MAIN, 0)
    _snapshot(cache, COMMIT_V2, 1)
    refs = cache / ("models--" + REPO.replace("/", "--")) / "refs"
    refs.mkdir()
    (refs / "main").write_text(COMMIT_MAIN)
    (refs / "v2").write_text(COMMIT_V2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HEADATLAS_CACHE", str(tmp_path / "headatlas-cache"))
    return cache


def _same_weights(loaded: ha.LoadedModel, seed: int) -> bool:
    ids = torch.tensor([[0, 10, 11, 12, 13]])
    with torch.no_grad():
        return torch.allclose(BUILDERS["llama"](seed)(ids).logits, loaded.model(ids).logits, atol=1e-6)


def test_a_hub_id_loads_from_the_cache_offline(hub_cache: Path) -> None:
    loaded = ha.load(REPO)
    assert loaded.info.source == REPO and loaded.info.revision == COMMIT_MAIN
    assert loaded.info.sha256 is not None and len(loaded.info.sha256) == 64
    assert _same_weights(loaded, 0) and not _same_weights(loaded, 1)
    assert loaded.info.to_dict()["revision"] == COMMIT_MAIN
    assert ha.ModelInfo.from_facts(loaded.info.to_dict()) == loaded.info


@pytest.mark.parametrize("revision", ["v2", COMMIT_V2])
def test_revision_picks_a_branch_or_a_commit(hub_cache: Path, revision: str) -> None:
    loaded = ha.load(REPO, revision=revision)
    assert loaded.info.revision == COMMIT_V2 and _same_weights(loaded, 1)


def test_the_hub_out_of_reach_falls_back_to_the_cache(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in offline mode, but no network: the cache answers, after one quick probe."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert ha.load(REPO).info.revision == COMMIT_MAIN


def test_a_missing_id_or_revision_offline_is_one_line(hub_cache: Path) -> None:
    with pytest.raises(ha.HeadatlasError, match=r"^no model 'tiny-org/absent' here and offline mode") as info:
        ha.load("tiny-org/absent")
    message = str(info.value)
    assert "\n" not in message and "huggingface-cli download tiny-org/absent" in message
    assert str(hub_cache) in message
    with pytest.raises(ha.HeadatlasError, match=r"at revision 'v9'"):
        ha.load(REPO, revision="v9")


def test_revision_is_for_hub_ids_only(tiny_model_dir: Path) -> None:
    with pytest.raises(ha.HeadatlasError, match=r"^revision applies to hub ids only"):
        ha.load(str(tiny_model_dir), revision="main")


def test_scan_a_hub_id_at_a_revision(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    args = ["scan", REPO, "--revision", "v2", "--probes", "repeat", "--n-prompts", "2"]
    args += ["--seq-len", "16", "--batch-size", "2", "--no-figures", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = json.loads((out / "atlas.json").read_text())["model"]
    assert model["source"] == REPO and model["revision"] == COMMIT_V2
    assert ha.Atlas.load(out).model.revision == COMMIT_V2
    result = CliRunner().invoke(app, ["scan", "tiny-org/absent", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "huggingface-cli download tiny-org/absent" in result.output


_REMOTE_CONFIG = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
_REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def test_trust_remote_code_is_off_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that ships its own code loads only with ``trust_remote_code=True``."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    directory = tmp_path / "remote"
    BUILDERS["llama"](0).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "tiny_remote"
    config["architectures"] = ["TinyRemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIG)
    (directory / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL)
    with pytest.raises(ha.HeadatlasError, match="trust_remote_code") as info:
        ha.load(str(directory))
    assert "\n" not in str(info.value)
    loaded = ha.load(str(directory), trust_remote_code=True)
    assert type(loaded.model).__name__ == "TinyRemoteForCausalLM" and _same_weights(loaded, 0)


def test_loading_prints_nothing(tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """No transformers progress bar or warning leaks into a user's output; their settings return."""
    import transformers.utils.logging as hf_logging

    hf_logging.enable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    ha.load(str(tiny_model_dir))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity
