"""load(): model facts, and one-line errors for models it cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headatlas as ha
from tiny_models import BUILDERS, make_tokenizer


def test_model_info_of_tiny_models() -> None:
    tok = make_tokenizer()
    expected = {
        "llama": (3, 4, 2, True),
        "gpt2": (2, 4, 4, True),
        "bert": (2, 4, 4, False),
        "gemma3": (4, 4, 1, True),
    }
    for arch, (layers, heads, kv, causal) in expected.items():
        info = ha.load(BUILDERS[arch](0), tokenizer=tok).info
        assert (info.n_layers, info.n_heads, info.n_kv_heads, info.causal) == (layers, heads, kv, causal)
        assert info.head_dim == 16
        assert [info.kv_head(h) for h in range(heads)] == [h // (heads // kv) for h in range(heads)]


def test_local_dir_roundtrip_records_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADATLAS_CACHE", str(tmp_path / "cache"))
    model, tok = BUILDERS["qwen2"](0), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = ha.load(str(tmp_path / "m"))
    assert loaded.info.sha256 is not None and len(loaded.info.sha256) == 64
    assert loaded.info.source == str((tmp_path / "m").resolve())
    ids = torch.tensor([[0, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded.model(ids).logits, atol=1e-6)


@pytest.mark.parametrize("name", ["./no/such/model", "/nonexistent/model.gguf"])
def test_missing_model(name: str) -> None:
    with pytest.raises(ha.HeadatlasError, match="no model at") as info:
        ha.load(name)
    assert "\n" not in str(info.value)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ha.HeadatlasError, match=r"config\.json"):
        ha.load(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Really offline: huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, into
    ``constants.HF_HUB_OFFLINE``, which its ``is_offline_mode()`` (what transformers asks) returns;
    setting only the variable here would wait out real Hub requests and their retries."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.is_offline_mode()
    with pytest.raises(
        ha.HeadatlasError, match=r"^no model 'nobody-xyz/not-a-model' here and offline mode is on"
    ) as info:
        ha.load("nobody-xyz/not-a-model")
    assert "\n" not in str(info.value) and "give 'default'" in str(info.value)
    with pytest.raises(ha.HeadatlasError, match="did you mean 'default'"):
        ha.load("defualt")


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in offline mode, but no network: one quick probe, no retries of transformers' own."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ha.HeadatlasError, match=r"huggingface\.co cannot be reached"):
        ha.load("nobody-xyz/not-a-model")


def test_a_path_object_loads_like_a_string(tiny_model_dir: Path) -> None:
    assert ha.load(tiny_model_dir).info.n_layers == ha.load(str(tiny_model_dir)).info.n_layers
    with pytest.raises(ha.HeadatlasError, match=r"^model must be a packaged name"):
        ha.load(12)  # type: ignore[arg-type]


def test_model_without_attention_layers() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, state_size=4)
    with pytest.raises(ha.HeadatlasError, match="no attention layers"):
        ha.load(MambaForCausalLM(config), tokenizer=make_tokenizer())


def test_in_memory_model_needs_tokenizer() -> None:
    with pytest.raises(ha.HeadatlasError, match="tokenizer"):
        ha.load(BUILDERS["gpt2"](0))


def test_bad_dtype() -> None:
    with pytest.raises(ha.HeadatlasError, match="dtype"):
        ha.load("default", dtype="float8")
