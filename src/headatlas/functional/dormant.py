"""Battery ``dormant`` → active–dormant heads: does a sink head read the first token, or park on it?

Guo et al. 2024 ("Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token
Phenomena in LLMs") find that a head which puts most of its attention on the first token usually
finds a near-zero *value state* there (the value-state drain), so its output is near zero: the head
is **dormant** on that input. The same head can be **active** (attend to content, write something)
on inputs of another domain. The plain ``first_token`` score cannot tell a dormant sink from a head
that really reads the first token; the value norm at the sink and the head's output norm can.

Per sequence ``s`` and head ``h`` (rows are queries at logical position ≥ 1, keys ``j ≥ 1`` the
tokens after the first; ``v_j`` the head's value state at key ``j``, read through the one capture
mechanism, :attr:`~headatlas.capture.session.CaptureSession.on_qkv`; ``z_i`` its output at query
``i``, read through :func:`~headatlas.capture.head_outputs`):

- ``a0 = mean_i A[i, first]`` (the ``first_token`` score of this sequence);
- ``sink_value_norm = ‖v_first‖ / mean_{j≥1} ‖v_j‖`` — the value-state drain (≪ 1 when drained);
- ``sink_output_norm = mean_i ‖z_i‖ / mean_{j≥1} ‖v_j‖`` — how much the head writes, in units of
  a typical value state;
- ``sink_read = a0 · sink_value_norm`` — the norm of what the first token contributes to the
  output (``Σ_i A[i, first] ‖v_first‖``, averaged), in the same units;
- dormant on ``s`` when ``a0 ≥`` :data:`SINK_ATTENTION` and ``sink_output_norm ≤``
  :data:`DORMANT_OUTPUT`; ``dormancy`` is the rate over every sequence of every domain.

Domains (:data:`DOMAINS`): ``prose`` (UD English EWT train), ``code`` (Python standard-library
source read from this interpreter's own files, PSF license) and ``repeat`` (random tokens repeated
twice, the induction battery's sequences). The per-domain rates are the side table
``dormant_domains``; a head dormant on one domain and active on another is Guo et al.'s
active–dormant head. Atlas values are means over sequences (``n`` counts sequences).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atlas.stats import HeadStats
from ..batteries.base import Battery, make_batch, pad_id
from ..batteries.natural import natural_battery
from ..batteries.repeat import repeat_battery
from ..capture import capture, head_outputs
from ..capture.views import AttentionView
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.sequences import read_utf8
from ..data.ud import ewt_sentences
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult

DEFAULT_PROMPTS = 8
"""Sequences per domain."""
SEQ_LEN = 128
"""Tokens per sequence."""
SINK_ATTENTION = 0.6
"""A head parks on the first token of a sequence when ≥ this share of its attention goes there
(the ``sink`` role's threshold, Clark et al. 2019's [CLS]/[SEP] cut-off)."""
DORMANT_OUTPUT = 0.3
"""… and is dormant there when its mean output norm is ≤ this many typical value norms: a head
reading a first token with an ordinary value would write ≥ ``SINK_ATTENTION`` ≈ 0.6 of one."""
DOMAINS = ("prose", "code", "repeat")
"""Text domains, in side-table order."""
CODE_MODULES = (
    "argparse",
    "json.decoder",
    "textwrap",
    "dataclasses",
    "difflib",
    "functools",
    "shutil",
    "ast",
)
"""Standard-library modules whose source is the ``code`` domain."""
DORMANT_SCORES = ("dormancy", "sink_value_norm", "sink_output_norm", "sink_read")


def code_corpus() -> list[str]:
    """Return blocks (split on blank lines) of Python standard-library source, read from this
    interpreter's files; raise :class:`HeadatlasError` when none can be read."""
    blocks: list[str] = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py") and Path(origin).is_file():
            blocks.extend(b for b in read_utf8(origin).split("\n\n") if b.strip())
    if not blocks:
        raise HeadatlasError("no Python standard-library source found for the dormant battery's code domain")
    return blocks


def domain_batteries(loaded: LoadedModel, n: int, seq_len: int, seed: int) -> dict[str, Battery]:
    """Return the battery of each domain of :data:`DOMAINS` (``n`` sequences of ``seq_len`` tokens)."""
    tok = loaded.tokenizer
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    return {
        "prose": natural_battery(tok, ewt_sentences("train"), n, seq_len, seed, "UD English EWT train"),
        "code": natural_battery(tok, code_corpus(), n, seq_len, seed, "Python standard library"),
        "repeat": repeat_battery(tok, vocab, n, seq_len, seed),
    }


def dormant_rows(
    first: torch.Tensor, value_norms: torch.Tensor, out_norms: torch.Tensor, keys: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Return each score per sequence and head, ``{name: [batch, head]}`` (Guo et al. 2024).

    Args:
        first: mean attention on the first token over the scored queries, ``[batch, head]``.
        value_norms: ‖v‖ of every key per query head, ``[batch, head, key]``.
        out_norms: mean ‖z‖ over the scored queries, ``[batch, head]``.
        keys: which keys are the tokens after the first (their mean is the unit), ``[batch, key]``;
            key 0 is the first token (its norm is ``value_norms[..., 0]``).
    """
    k = keys[:, None].to(value_norms.dtype)  # [batch, 1, key]
    typical = (value_norms * k).sum(-1) / k.sum(-1).clamp_min(1.0)  # [batch, head]
    typical = typical.clamp_min(1e-12)
    sink_value = value_norms[..., 0] / typical  # [batch, head]
    output = out_norms / typical  # [batch, head]
    dormant = (first >= SINK_ATTENTION) & (output <= DORMANT_OUTPUT)  # [batch, head]
    return {
        "dormancy": dormant.to(first.dtype),
        "sink_value_norm": sink_value,
        "sink_output_norm": output,
        "sink_read": first * sink_value,
    }


@dataclass
class _Pass:
    """One forward pass's per-layer readings (filled by the three callbacks, consumed at ``o_proj``)."""

    positions: torch.Tensor  # [batch, seq]
    first: dict[int, torch.Tensor] = field(default_factory=dict)  # [batch, head] sums
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # [batch, head, key]


def _first_index(positions: torch.Tensor) -> torch.Tensor:
    return (positions == 0).float().argmax(dim=-1)  # [batch]


def run_domain(
    loaded: LoadedModel, battery: Battery, batch_size: int, stats: HeadStats, first: HeadStats | None = None
) -> None:
    """Add one row per sequence of ``battery`` to ``stats`` (every score of :data:`DORMANT_SCORES`) and,
    when given, its mean attention on the first token to ``first`` (as ``first_token``)."""
    info = loaded.info
    group = info.n_heads // info.n_kv_heads
    pad = pad_id(loaded.tokenizer)

    def on_view(view: AttentionView) -> None:
        ctx: _Pass = session.context
        pos = ctx.positions[:, view.q_index]  # [batch, query]
        a = view.at_keys(_first_index(ctx.positions)) * (pos >= 1)[:, None]  # [batch, head, query]
        ctx.first[view.layer] = ctx.first.get(view.layer, 0) + a.sum(-1)  # [batch, head]

    def on_qkv(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _Pass) -> None:
        norms = v.float().norm(dim=-1).repeat_interleave(group, dim=1)  # [batch, head, key]
        if norms.shape[-1] == ctx.positions.shape[-1]:
            idx = _first_index(ctx.positions)[:, None, None].expand(-1, norms.shape[1], 1)  # [batch, head, 1]
            first = norms.gather(-1, idx)  # [batch, head, 1]
            ctx.values[layer] = torch.cat([first, norms], dim=-1)  # [batch, head, 1 + key]

    def on_output(layer: int, z: torch.Tensor, _tap: object) -> None:
        ctx: _Pass = session.context
        if layer not in ctx.first or layer not in ctx.values:
            return
        scored = (ctx.positions >= 1).to(z.device)  # [batch, query]
        count = scored.sum(-1).clamp_min(1)[:, None]  # [batch, 1]
        zn = (z.float().norm(dim=-1) * scored[..., None]).sum(1) / count  # [batch, head]
        keys = torch.cat([torch.zeros_like(scored[:, :1]), scored], dim=-1)  # [batch, 1 + key]
        a0 = ctx.first.pop(layer) / count  # [batch, head]
        rows = dormant_rows(a0, ctx.values.pop(layer), zn, keys)
        ok = scored.sum(-1, keepdim=True) >= 1  # [batch, 1]
        for name, values in rows.items():
            stats.add(name, layer, values[..., None], ok)  # one row per sequence
        if first is not None:
            first.add("first_token", layer, a0[..., None], ok)

    seqs = battery.sequences
    with head_outputs(loaded, on_output), capture(loaded, on_view) as session:
        session.on_qkv = on_qkv
        for i in range(0, len(seqs), batch_size):
            batch = make_batch(seqs[i : i + batch_size], pad)
            positions = batch.positions.to(loaded.device)
            session.run(batch.input_ids, batch.attention_mask, with_head=False, context=_Pass(positions))


def run_dormant(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head's sink value norm, output norm, first-token read-out and dormancy rate over
    the text domains (Guo et al. 2024); return a :class:`FunctionalResult` with the per-domain side
    table ``dormant_domains``."""
    import pandas as pd

    info = loaded.info
    n = config.n_prompts or DEFAULT_PROMPTS
    seq_len = min(config.max_len or SEQ_LEN, info.context_length or SEQ_LEN)
    batteries = domain_batteries(loaded, n, seq_len, config.seed)
    total = HeadStats(info.n_layers, info.n_heads)
    rows = []
    for index, (domain, battery) in enumerate(batteries.items()):
        stats = HeadStats(info.n_layers, info.n_heads)
        first = HeadStats(info.n_layers, info.n_heads)
        run_domain(loaded, battery, config.batch_size, stats, first)
        total = total.merge(stats)
        means = {name: stats.mean(name) for name in DORMANT_SCORES} | {
            "first_token": first.mean("first_token")
        }
        for layer in range(info.n_layers):
            for head in range(info.n_heads):
                rows.append(
                    {"layer": layer, "head": head, "domain": domain}
                    | {name: float(value[layer, head]) for name, value in means.items()}
                )
        progress(index + 1, len(batteries))
    params = {
        "domains": list(batteries),
        "n_prompts": n,
        "seq_len": seq_len,
        "seed": config.seed,
        "sink_attention": SINK_ATTENTION,
        "dormant_output": DORMANT_OUTPUT,
        "code_modules": list(CODE_MODULES),
    }
    return FunctionalResult("dormant", total, params, {"dormant_domains": pd.DataFrame(rows)})


def domain_losses(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> dict[str, float]:
    """Return the mean next-token loss (nats) of each domain of :data:`DOMAINS` (on ``repeat``, over
    the second copy only: the first is random tokens) — what ablating dormant heads should barely
    move (Guo et al. 2024) and ablating active heads should."""
    n = config.n_prompts or DEFAULT_PROMPTS
    seq_len = min(config.max_len or SEQ_LEN, loaded.info.context_length or SEQ_LEN)
    pad = pad_id(loaded.tokenizer)
    out: dict[str, float] = {}
    batteries = domain_batteries(loaded, n, seq_len, config.seed)
    with torch.no_grad():
        for index, (domain, battery) in enumerate(batteries.items()):
            total = count = 0.0
            seqs = battery.sequences
            for i in range(0, len(seqs), config.batch_size):
                batch = make_batch(seqs[i : i + config.batch_size], pad)
                ids = batch.input_ids.to(loaded.device)
                mask = batch.attention_mask.to(loaded.device)
                logits = loaded.model(
                    input_ids=ids, attention_mask=mask
                ).logits.float()  # [batch, seq, vocab]
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
                )  # [batch, seq - 1]
                keep = mask[:, 1:].bool() & mask[:, :-1].bool()  # [batch, seq - 1]
                if battery.period is not None:  # predicting a token of the second copy
                    keep &= batch.positions[:, 1:].to(keep.device) >= battery.repeat_start + battery.period
                total += float(nll[keep].sum())
                count += float(keep.sum())
            out[domain] = total / max(count, 1.0)
            progress(index + 1, len(batteries))
    return out


def domain_loss(loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress) -> float:
    """Return the mean over domains of :func:`domain_losses`."""
    return float(sum(domain_losses(loaded, config, progress).values()) / len(DOMAINS))


SPEC = BatterySpec(
    name="dormant",
    run=run_dormant,
    metric=domain_loss,
    metric_name="next-token loss over prose, code and repeated tokens",
    higher_is_better=False,
)
