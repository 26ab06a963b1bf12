"""The conformance sweep: tiny models of transformers' families, checked against eager references;
the architecture table has no dead rows; ``docs/models.md`` agrees with the code; ``doctor``.

Tests that build families beyond the five test builders depend on the transformers version (the
families, their configs and their attention code change between releases), so they are ``slow``:
``make test`` runs them, ``make test-lower`` (the oldest transformers the ranges allow) does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import headatlas as ha
from conftest import requires_default_model
from headatlas.apps.conformance import by_name, category, run_family
from headatlas.apps.conformance.checks import CHECKS, Outcome, check_ablate
from headatlas.apps.conformance.families import KINDS, REPRESENTATIVE, Family, families, load_tiny, shrink
from headatlas.apps.conformance.page import page_rows, stable, table_row
from headatlas.apps.conformance.sweep import Row, time_limit
from headatlas.capture.hook import output_projections
from headatlas.cli import app
from headatlas.cli.conformance import all_checks
from headatlas.core.errors import HeadatlasError
from headatlas.model import archs

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "models.md"

SUBSET = REPRESENTATIVE


def _family(kind: str, name: str) -> Family:
    return next(f for f in families((kind,)) if f.name == name)


def test_shrinker_rewrites_sizes_nested_configs_and_per_layer_lists() -> None:
    values = {
        "hidden_size": 4096,
        "num_hidden_layers": 6,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "mlp_only_layers": [0, 1, 2, 3, 4, 5],
        "text_config": {"model_type": "x", "hidden_size": 2048, "num_attention_heads": 16},
        "pad_token_id": None,
    }
    tiny = shrink(values, {"hidden_size": 32})
    assert tiny["hidden_size"] == 32  # the override wins
    assert tiny["num_attention_heads"] == 4 and tiny["num_key_value_heads"] == 2  # GQA kept
    assert tiny["layer_types"] == ["sliding_attention", "full_attention"]  # one of each type
    assert tiny["num_hidden_layers"] == 2
    assert tiny["text_config"]["hidden_size"] == 64
    assert tiny["pad_token_id"] == 2


def test_shrinker_keeps_per_layer_overrides_of_the_kept_layers() -> None:
    """``per_layer_config`` (Gemma 4: wider heads on its full-attention layers) follows the kept
    layers, renumbered, and a wider per-layer size stays wider than the config's own."""
    values = {
        "num_hidden_layers": 6,
        "head_dim": 256,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "per_layer_config": {"02": {"sliding_window": 512}, "05": {"head_dim": 512, "sliding_window": None}},
    }
    tiny = shrink(values)
    assert tiny["layer_types"] == ["sliding_attention", "full_attention"]
    assert tiny["per_layer_config"] == {"01": {"head_dim": 32, "sliding_window": None}}
    assert tiny["head_dim"] == 16


def test_time_limit_stops_a_family(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    sweep_module = importlib.import_module("headatlas.apps.conformance.sweep")

    def forever(_family: Family) -> None:
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(sweep_module, "load_tiny", forever)
    row = run_family(Family("llama", "causal", "LlamaForCausalLM"), limit=0.3)
    assert category(row) == "error" and "timeout" in (row.build or "")


def test_a_crash_is_an_error_outcome_never_a_number() -> None:
    def crash(_loaded: object) -> Outcome:
        raise RuntimeError("boom")

    from headatlas.apps.conformance import run_check

    outcome = run_check(crash, None)  # type: ignore[arg-type]
    assert outcome.status == "error" and "boom" in outcome.detail and outcome.delta is None


def test_unknown_family_is_a_one_line_error() -> None:
    with pytest.raises(HeadatlasError, match="no family 'nope'"):
        by_name(["nope"])


def test_the_timer_is_off_the_main_thread() -> None:
    import threading

    done: list[bool] = []

    def work() -> None:
        with time_limit(0.01):
            time.sleep(0.05)
        done.append(True)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert done == [True]


@pytest.mark.slow
def test_every_architecture_row_is_used_by_a_family() -> None:
    """A row of :data:`headatlas.model.archs.ARCHITECTURES` no mapping uses is dead; a row whose
    pattern matches no module of its family's tiny model is dead too."""
    names = {f.name for f in families()}
    dead = sorted(set(archs.ARCHITECTURES) - names)
    assert dead == [], f"rows no family of the mappings uses: {dead}"
    for name, spec in archs.ARCHITECTURES.items():
        if not spec.o_proj:
            continue
        family = next(f for f in families() if f.name == name)
        model = load_tiny(family).model
        matched = [n for n, _ in model.named_modules() if archs.match_layer(spec.o_proj, n) is not None]
        assert matched, f"the {name} row's patterns match no module of its tiny model"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_neox", "bloom", "mpt", "gptj", "codegen", "falcon"])
def test_structure_finds_the_projection_a_row_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_tiny(_family("causal", name))
    by_row = output_projections(loaded)
    monkeypatch.setitem(archs.ARCHITECTURES, name, archs.ArchSpec(()))
    by_structure = output_projections(loaded)
    assert {k: id(v) for k, v in by_structure.items()} == {k: id(v) for k, v in by_row.items()}
    assert len(by_row) == loaded.info.n_layers


@pytest.mark.slow
def test_latent_attention_ablation_is_exact() -> None:
    """DeepSeek V3's q/k head size (24 here) differs from its value head size (16): one head's output
    is 16 wide at the projection, and ablating it equals zeroing it inside attention."""
    loaded = load_tiny(_family("causal", "deepseek_v3"))
    assert loaded.info.head_dim == 16
    outcome = check_ablate(loaded)
    assert outcome.status == "ok" and outcome.detail == "", outcome


@pytest.mark.slow
def test_refusals_are_one_line_headatlas_errors() -> None:
    diff = load_tiny(_family("causal", "diffllama"))
    with pytest.raises(HeadatlasError, match="differential attention"):
        ha.ablate(diff, ["L0H0"]).__enter__()
    falcon = load_tiny(_family("causal", "falcon"))
    with pytest.raises(HeadatlasError, match="output_attentions"):
        ha.attention_maps(falcon, falcon.tokenizer(["a b c"], return_tensors="pt")["input_ids"])


@pytest.mark.slow
def test_per_layer_head_sizes_are_refused_with_the_reason() -> None:
    """Gemma 4's full-attention layers have wider heads than its sliding ones: one head width per
    atlas cannot describe them, so loading says so (it raised transformers' own error before)."""
    with pytest.raises(HeadatlasError, match="head_dim differs between layers"):
        load_tiny(_family("causal", "gemma4_text"))


@pytest.mark.slow
def test_page_rows_match_the_code() -> None:
    """Regenerate the rows of :data:`SUBSET` and compare them with ``docs/models.md`` (measured |Δ|
    aside). When this fails, the code changed what works: run ``make models-doc`` on purpose."""
    assert PAGE.is_file(), "docs/models.md is missing: run make models-doc"
    rows = page_rows(PAGE.read_text(encoding="utf-8"))
    for kind in KINDS:
        assert {name for k, name in rows if k == kind} == {f.name for f in families((kind,))}, (
            f"the page's {kind} families differ from transformers' mapping: run make models-doc"
        )
    checks = all_checks()
    for kind, name in SUBSET:
        row = run_family(_family(kind, name), checks)
        assert stable(table_row(row)) == stable(rows[(kind, name)]), f"{kind} {name}: run make models-doc"
        assert all(o.status != "wrong" for o in row.outcomes.values()), (name, row.outcomes)


@pytest.mark.slow
def test_page_has_no_wrong_number() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert "✗ wrong" not in text
    assert "| wrong | 0 | 0 | 0 |" in text


def test_doctor_on_a_tiny_model(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    for name in [*CHECKS, "kv"]:
        line = next(line for line in result.output.splitlines() if line.strip("│ ").startswith(name))
        assert "✓" in line, line


def test_doctor_names_the_reason_for_an_encoder(tmp_path: Path) -> None:
    from tiny_models import BUILDERS, make_tokenizer

    BUILDERS["bert"](0).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["doctor", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("kv: ") and "not a causal decoder" in line for line in lines)
    assert any(line.startswith("prune: head pruning does not support") for line in lines)


@pytest.mark.slow
@requires_default_model
def test_doctor_on_the_default_model() -> None:
    result = CliRunner().invoke(app, ["doctor", "default"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert result.output.count("✓") == len(CHECKS) + 1, result.output


def test_row_category_follows_capture() -> None:
    family = Family("x", "causal", "X")
    assert category(Row(family, {"capture": Outcome("ok", 1e-8, "fast")})) == "exact (fast path)"
    assert (
        category(Row(family, {"capture": Outcome("ok", 0.0, "eager fallback")})) == "exact (eager fallback)"
    )
    assert category(Row(family, {"capture": Outcome("refused", None, "why")})) == "refused"
    assert category(Row(family, build="no attention: none")) == "no attention"
    assert category(Row(family, build="cannot build tiny: config")) == "cannot build tiny"
