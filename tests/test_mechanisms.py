"""One place for each mechanism: how sequences start, the head-output hook, score specs, head names,
errors that name parameters, atomic writes, the scan config as resume fingerprint, and the
one-way import order of the stages."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import headatlas as ha
from headatlas.batteries import ATTENTION_BATTERIES, attention_battery
from headatlas.batteries.natural import natural_battery, text_battery
from headatlas.batteries.repeat import repeat_battery
from headatlas.capture import head_outputs, output_projections
from headatlas.core.errors import HeadatlasError, check_at_least, param
from headatlas.core.heads import check_heads, head_name, parse_head, parse_heads
from headatlas.core.roles import RULES
from headatlas.core.scores import LOCAL_WINDOW, SCORES
from headatlas.core.storage import atomic_dir, atomic_path, owned_files, write_json
from headatlas.data.sequences import chat_frame, encode_text, sequence_frame
from headatlas.detectors.attention import DETECTOR_SCORES
from headatlas.functional import FUNCTIONAL_BATTERIES, battery_spec
from headatlas.scanning.config import ScanConfig
from headatlas.scanning.scan import scan
from tiny_models import BUILDERS, eager_attentions, left_padded_batch, make_tokenizer, word_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "headatlas"
CORPUS = ["The cat sat on the mat.", "The dog ran to the park.", "A bird sang in the tree."] * 20

# ---------------------------------------------------------------- how a sequence starts


def test_a_bos_the_tokenizer_never_adds_is_never_added() -> None:
    tok = make_tokenizer(add_bos=False)
    assert isinstance(tok.bos_token_id, int)  # it has one ...
    frame = sequence_frame(tok)
    assert frame.prefix == () and frame.suffix == () and frame.describe()["sequence_start"] == "none"
    for battery in (
        natural_battery(tok, CORPUS, 3, 24, 0, "test"),
        repeat_battery(tok, 400, 3, 24, 0),
        text_battery(tok, ["The cat sat."], None),
    ):
        for seq in battery.sequences:
            assert tok.bos_token_id not in seq.ids, battery.name  # ... and no battery adds it
    ids, _ = encode_text(tok, "The cat sat.")
    assert ids == tok("The cat sat.")["input_ids"]
    assert repeat_battery(tok, 400, 1, 24, 0).repeat_start == 0


def test_a_bos_the_tokenizer_adds_starts_every_sequence() -> None:
    tok = make_tokenizer()
    frame = sequence_frame(tok)
    assert frame.prefix == (tok.bos_token_id,) and frame.start == "bos <bos>"
    natural = natural_battery(tok, CORPUS, 3, 24, 0, "test")
    assert all(s.ids[0] == tok.bos_token_id and len(s.ids) == 24 for s in natural.sequences)
    assert all(s.word_ids is not None and s.word_ids[0] == -1 for s in natural.sequences)
    repeat = repeat_battery(tok, 400, 2, 25, 0)
    period = repeat.period or 0
    for s in repeat.sequences:
        assert s.ids[0] == tok.bos_token_id and s.ids[1 : 1 + period] == s.ids[1 + period :]
    assert natural.params["sequence_start"] == "bos <bos>"


def test_an_encoder_gets_its_own_cls_and_sep() -> None:
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer(add_bos=False)
    from tokenizers import processors

    backend = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", cls_token="[CLS]", sep_token="[SEP]"
    )
    frame = sequence_frame(tok)
    assert frame.prefix == (3,) and frame.suffix == (4,)
    assert frame.describe() == {"sequence_start": "special [CLS]", "sequence_end": "special [SEP]"}
    natural = natural_battery(tok, CORPUS, 2, 20, 0, "test")
    assert all(s.ids[0] == 3 and s.ids[-1] == 4 and len(s.ids) == 20 for s in natural.sequences)


def test_first_token_is_the_first_token_the_model_sees(tmp_path: Path) -> None:
    """Scanned with a tokenizer that adds no BOS, first_token is attention to the text's first token."""
    model = BUILDERS["llama"](0)
    loaded = ha.load(model, tokenizer=make_tokenizer(add_bos=False))
    atlas = ha.scan(
        loaded, probes=["natural"], texts=["The cat sat on the mat and looked at the dog."], out=tmp_path
    )
    assert atlas.meta["sequence_start"] == "none" and ha.Atlas.load(tmp_path).meta["sequence_end"] == "none"
    ids = torch.tensor(
        [make_tokenizer(add_bos=False)("The cat sat on the mat and looked at the dog.")["input_ids"]]
    )
    attns = eager_attentions(model, ids, torch.ones_like(ids))
    reference = np.array([a[0, :, 1:, 0].mean(-1).numpy() for a in attns])  # [layer, head]
    np.testing.assert_allclose(atlas.matrix("first_token"), reference, atol=1e-5)


def test_chat_frame_starts_as_the_template_starts() -> None:
    assert chat_frame(make_tokenizer(add_bos=False)) is None  # no template
    tok = word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", "user", "assistant", "hi"])
    tok.chat_template = (
        "<bos>{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}assistant"
    )
    frame = chat_frame(tok)
    assert frame is not None and frame.before == "<bos>user " and frame.after == "\nassistant"
    assert frame.start == "template <bos>"


# ---------------------------------------------------------------- the head-output hook


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "qwen2"])
def test_head_outputs_are_the_output_projection_input(kind: str) -> None:
    model = BUILDERS[kind](0)
    loaded = ha.load(model, tokenizer=make_tokenizer())
    ids, mask = left_padded_batch(
        make_tokenizer(), ["The cat sat.", "The dog ran to the park with the ball."]
    )
    seen: dict[int, torch.Tensor] = {}
    direct: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, layer=layer: direct.__setitem__(layer, args[0].clone()))
        for layer, m in output_projections(loaded).items()
    ]

    def keep(layer: int, z: torch.Tensor, context: object) -> None:
        assert context == "batch-1"
        seen[layer] = z.clone()

    with head_outputs(loaded, keep) as tap, torch.no_grad():
        tap.context = "batch-1"
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    info = loaded.info
    assert sorted(seen) == list(range(info.n_layers))
    for layer, z in seen.items():
        assert z.shape == (*ids.shape, info.n_heads, info.head_dim)
        torch.testing.assert_close(z.reshape(*ids.shape, -1), direct[layer])


def test_a_replacement_changes_the_model_and_the_hook_goes_away() -> None:
    model = BUILDERS["llama"](0)
    loaded = ha.load(model, tokenizer=make_tokenizer())
    ids, mask = left_padded_batch(make_tokenizer(), ["The cat sat on the mat."])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits

    def zero_head_one(layer: int, z: torch.Tensor, _ctx: object) -> torch.Tensor:
        out = z.clone()
        out[..., 1, :] = 0
        return out

    with head_outputs(loaded, zero_head_one, layers=[0]), torch.no_grad():
        changed = model(input_ids=ids, attention_mask=mask).logits
    with ha.ablate(loaded, [(0, 1)]), torch.no_grad():
        ablated = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, changed)
    torch.testing.assert_close(changed, ablated)  # ablate is this hook
    torch.testing.assert_close(before, after)  # removed on exit

    def wrong_shape(layer: int, z: torch.Tensor, _ctx: object) -> torch.Tensor:
        return z[..., :1, :]

    with pytest.raises(HeadatlasError, match="expected"), head_outputs(loaded, wrong_shape), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(HeadatlasError, match="layer 9"), head_outputs(loaded, zero_head_one, layers=[9]):
        pass


def test_gradients_flow_through_a_replacement() -> None:
    model = BUILDERS["llama"](0)
    loaded = ha.load(model, tokenizer=make_tokenizer())
    ids, mask = left_padded_batch(make_tokenizer(), ["The cat sat on the mat."])
    scale = torch.ones(loaded.info.n_heads, requires_grad=True)

    def gate(layer: int, z: torch.Tensor, _ctx: object) -> torch.Tensor:
        return z * scale[:, None]

    with head_outputs(loaded, gate, layers=[1]):
        loss = model(input_ids=ids, attention_mask=mask).logits.square().mean()
    (grad,) = torch.autograd.grad(loss, scale)
    assert grad.shape == (loaded.info.n_heads,) and bool(grad.abs().sum() > 0)


def test_only_capture_hooks_head_outputs() -> None:
    """Every forward hook on a module lives in capture/ (the one mechanism)."""
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "capture" not in path.parts and "register_forward" in path.read_text()
    ]
    assert offenders == []
    readers = sorted(p.name for p in SRC.rglob("*.py") if "bos_token_id" in p.read_text())
    # ct2 writes a converted Whisper's config, families.py the special ids of the conformance sweep's
    # tiny configs: neither decides how a sequence starts.
    assert readers == ["ct2.py", "families.py", "sequences.py"]


def test_only_compat_swaps_attention_implementations() -> None:
    """A model's attention backend is swapped and restored through ``model.compat`` alone, which
    puts back every sub-model's own implementation (one place)."""
    swappers = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "set_attn_implementation" in p.read_text()
    )
    assert swappers == ["model/compat.py"]


# ---------------------------------------------------------------- scores as data


def test_every_score_any_battery_emits_has_a_spec(tiny_loaded: ha.LoadedModel) -> None:
    emitted = {s for scores in DETECTOR_SCORES.values() for s in scores}
    for name in FUNCTIONAL_BATTERIES:
        spec = battery_spec(name)
        assert spec.scores, name
        emitted |= set(spec.scores)
    assert emitted <= set(SCORES)
    for detector, scores in DETECTOR_SCORES.items():
        batteries = {b for b in ATTENTION_BATTERIES if detector in attention_battery(b).detectors}
        assert {SCORES[s].battery for s in scores} <= batteries, detector
    atlas = ha.scan(
        tiny_loaded, probes=["natural", "repeat", "copy"], n_prompts=2, seq_len=24, n_functional=2
    )
    assert set(atlas.scores) | {"distance_profile"} <= set(SCORES)
    assert all(rule.score in SCORES for rule in RULES)


def test_score_facts_follow_their_constants() -> None:
    assert f"last {LOCAL_WINDOW} tokens" in SCORES["local"].meaning
    assert f"last {LOCAL_WINDOW} tokens" in next(r for r in RULES if r.role == "local").meaning
    assert SCORES["copying"].signed and SCORES["distance_profile"].vector and not SCORES["entropy"].bounded


# ---------------------------------------------------------------- heads, errors, files


def test_one_spelling_out_every_spelling_in() -> None:
    for text in ("L3H1", "L3 H1", "L3.H1", "l3h1", "3.1", " 3 . 1 "):
        assert parse_head(text) == (3, 1), text
    assert head_name(3, 1) == "L3H1"
    assert parse_heads("L1H2, 0.3,L1H2", 3, 4) == [(1, 2), (0, 3)]
    with pytest.raises(HeadatlasError, match="cannot read head"):
        parse_head("x.y")
    with pytest.raises(HeadatlasError, match="no head L3H0: out of range"):
        check_heads([(3, 0)], 3, 4)
    with pytest.raises(HeadatlasError, match="integers"):
        check_heads([(True, 0)], 3, 4)  # type: ignore[list-item]


def test_errors_name_the_python_parameter_and_the_cli_the_flag() -> None:
    with pytest.raises(HeadatlasError) as raised:
        check_at_least("seq_len", 4, 8)
    assert str(raised.value) == "seq_len must be at least 8, got 4"
    assert raised.value.render() == "--seq-len must be at least 8, got 4"
    both = HeadatlasError(f"pass {param('force', 'force=True')} or {param('n_prompts')}")
    assert str(both) == "pass force=True or n_prompts"
    assert both.render() == "pass --force or --n-prompts" and both.params == ["force", "n_prompts"]
    assert both.render(lambda name: {"n_prompts": "--n-functional"}.get(name, name)).endswith(
        "--n-functional"
    )


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_replaces_a_directory_all_at_once(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in target.iterdir()] == ["old.bin"] and list(tmp_path.iterdir()) == [target]
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and not any(tmp.iterdir())
        (tmp / "new.bin").write_text("new")
        assert (target / "old.bin").exists()  # nothing changes until the block ends
    assert [p.name for p in target.iterdir()] == ["new.bin"] and list(tmp_path.iterdir()) == [target]


def test_an_atlas_written_over_removes_what_headatlas_wrote_and_keeps_the_users_files(
    tiny_loaded: ha.LoadedModel, tmp_path: Path
) -> None:
    from matplotlib.figure import Figure

    from headatlas.report.figures import save_figure

    out = tmp_path / "atlas"
    ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=24, out=out)
    write_json(out / "verify-induction.json", {})
    save_figure(Figure(figsize=(1, 1)), out / "figures" / "scores" / "induction.png")
    (out / "figures" / "mine.png").write_bytes(b"the user's")
    (out / "notes.txt").write_text("the user's")
    assert sorted(owned_files(out)) == ["figures/scores/induction.png", "verify-induction.json"]
    ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=24, out=out, force=True)
    assert not (out / "verify-induction.json").exists() and not (out / "figures" / "scores").exists()
    assert (out / "figures" / "mine.png").read_bytes() == b"the user's"
    assert (out / "notes.txt").read_text() == "the user's" and owned_files(out) == []


# ---------------------------------------------------------------- the scan config


def test_every_scan_setting_is_a_scan_argument_with_the_same_default() -> None:
    params = inspect.signature(scan).parameters
    for field in dataclasses.fields(ScanConfig):
        assert field.name in params, field.name
        default = params[field.name].default
        assert (tuple(default) if isinstance(default, list | tuple) else default) == field.default, field.name


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"n_prompts": 3}, {"seq_len": 32}, {"batch_size": 1}, {"n_functional": 3}]
)
def test_any_changed_setting_refuses_to_resume(
    tiny_loaded: ha.LoadedModel, tmp_path: Path, change: dict
) -> None:
    base = {"probes": ["natural", "copy"], "n_prompts": 2, "seq_len": 24, "batch_size": 2, "n_functional": 2}

    class Stop(Exception):
        pass

    def stop_after_first(done: object) -> None:
        raise Stop

    with pytest.raises(Stop):
        ha.scan(tiny_loaded, out=tmp_path, on_batch=stop_after_first, **base)
    with pytest.raises(HeadatlasError, match="other settings"):
        ha.scan(tiny_loaded, out=tmp_path, resume=True, **{**base, **change})


# ---------------------------------------------------------------- one-way imports, light readers


def test_show_report_and_serve_of_a_saved_atlas_do_not_import_torch(
    tiny_atlas_dir: Path, tmp_path: Path
) -> None:
    code = f"""
import json, sys
from typer.testing import CliRunner
from headatlas.cli import app
runner = CliRunner()
results = [runner.invoke(app, ["show", {str(tiny_atlas_dir)!r}, "--top", "3"]).exit_code,
           runner.invoke(app, ["report", {str(tiny_atlas_dir)!r}, "--out", {str(tmp_path / "r.html")!r}, "--no-figures"]).exit_code]
from headatlas.atlas import Atlas
from headatlas.serve import create_app
from starlette.testclient import TestClient
client = TestClient(create_app(Atlas.load({str(tiny_atlas_dir)!r})), base_url="http://127.0.0.1")
results.append(client.get("/api/heads", params={{"score": "induction", "top": 2}}).status_code)
print(json.dumps([results, "torch" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[0, 0, 200], False]


def test_every_command_help_shows_an_example() -> None:
    from typer.testing import CliRunner

    from headatlas.cli import app

    runner = CliRunner()
    commands = ["scan", "show", "map", "report", "serve", "importance", "redundancy", "prune", "prune-curve"]
    for command in [*commands, "verify", "data status", "data install"]:
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        assert "Example" in result.output and f"headatlas {command}" in result.output, command


def test_cli_errors_name_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from headatlas.cli import app

    result = CliRunner().invoke(app, ["scan", "default", "--n-prompts", "0", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--n-prompts must be at least 1" in result.output
