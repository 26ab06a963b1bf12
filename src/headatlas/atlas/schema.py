"""The atlas's schema: its version, the JSON Schema file, and migration of older atlases.

``atlas.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`). The JSON Schema in
``headatlas/atlas/atlas.schema.json`` (:func:`schema_path`) describes ``atlas.json`` and, under
``$defs/table``, the Parquet columns as :func:`describe_table` renders them; the tests validate
every atlas they write against it. :func:`migrate` brings metadata of an older version up to date
or says exactly what is missing. Like :mod:`headatlas.atlas.table`, this imports no pipeline stage.

History:

- version 0: atlases written before the field existed. They may lack ``sequence_start`` /
  ``sequence_end`` (recorded since sequences start as the tokenizer starts them) and the ``table``
  stamp; both are filled in on load.
- version 1: the current layout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import RESCAN, HeadatlasError, param

SCHEMA_VERSION = 1
"""The version :meth:`headatlas.Atlas.save` writes into ``atlas.json``."""
UNKNOWN_START = "unknown (written before headatlas recorded it)"
"""What a migrated version-0 atlas says about how its sequences started."""
REQUIRED_MODEL_FIELDS = (
    "name",
    "source",
    "sha256",
    "arch",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "causal",
    "context_length",
)
"""Fields of ``atlas.json``'s ``model`` object every version has had."""


def schema_path() -> Path:
    """Return the path of the packaged JSON Schema of ``atlas.json`` and the table's columns."""
    return Path(str(resources.files("headatlas") / "atlas" / "atlas.schema.json"))


def _kind(column: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(column):
        return "boolean"
    if pd.api.types.is_integer_dtype(column):
        return "integer"
    if pd.api.types.is_numeric_dtype(column):
        return "number"
    first = column.dropna().iloc[0] if column.notna().any() else ""
    return "string" if isinstance(first, str) else "list"


def describe_table(table: pd.DataFrame) -> dict[str, Any]:
    """Return ``{"columns": {name: kind}}`` (kind: integer, number, boolean, string or list) for
    validation against the schema's ``$defs/table``."""
    return {"columns": {str(name): _kind(table[name]) for name in table.columns}}


def migrate(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """Return ``meta`` brought up to :data:`SCHEMA_VERSION` (a new dict; the input is unchanged).

    Raises :class:`HeadatlasError` naming every missing field, or when the atlas comes from a newer
    headatlas than this one.
    """
    version = meta.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise HeadatlasError(f"{where}: schema_version {version!r} is not a version number")
    if version > SCHEMA_VERSION:
        raise HeadatlasError(
            f"{where} has schema version {version}; this headatlas reads up to {SCHEMA_VERSION}: upgrade headatlas"
        )
    model = meta.get("model")
    missing = (
        ["model"]
        if not isinstance(model, dict)
        else [f"model.{field}" for field in REQUIRED_MODEL_FIELDS if field not in model]
    )
    if missing:
        fix = param(RESCAN, "scan(..., force=True)")
        raise HeadatlasError(
            f"{where} (schema version {version}) lacks {', '.join(missing)}: rescan it: {fix}"
        )
    migrated = dict(meta)
    if version == 0:
        migrated.setdefault("sequence_start", UNKNOWN_START)
        migrated.setdefault("sequence_end", UNKNOWN_START)
    migrated["schema_version"] = SCHEMA_VERSION
    return migrated
