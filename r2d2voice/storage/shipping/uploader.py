"""Batched upserts into the fleet server: COPY into a temp table, then one INSERT … ON CONFLICT.

One call is one transaction: either the whole batch is on the server afterwards, or none of
it (a bad row, a lost connection). Rows are keyed by (``device_id``, natural id), so shipping
a batch twice leaves one copy, and a row shipped again replaces the server's non-key columns
(a session's end, an interruption flag, a late transcript). Rows whose values did not change
are not rewritten.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from r2d2voice.storage.shipping.server_schema import TABLES, TableSpec

__all__ = ["prepare_rows", "prepare_values", "upsert_rows", "upsert_values"]


def _json_value(value: Any) -> str | None:
    """jsonb text: dicts and lists encoded, JSON text kept, any other text as a JSON string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return json.dumps(value, ensure_ascii=False)
        return value
    return json.dumps(value, ensure_ascii=False)


def _int_value(value: Any) -> Any:
    """A whole number for an integer column (SQLite may hold ms figures as REAL)."""
    if isinstance(value, float) and math.isfinite(value):
        return round(value)
    return value


def _converters(spec: TableSpec) -> list[tuple[int, Callable[[Any], Any]]]:
    conv: list[tuple[int, Callable[[Any], Any]]] = []
    for i, col in enumerate(spec.columns):
        if col in spec.json:
            conv.append((i, _json_value))
        elif col in spec.ints:
            conv.append((i, _int_value))
    return conv


def prepare_rows(
    spec: TableSpec, device_id: str, rows: Iterable[Mapping[str, Any]]
) -> list[tuple[Any, ...]]:
    """``(device_id, *columns)`` tuples, one per natural key (the last row wins).

    Each row must have exactly the table's columns (:attr:`TableSpec.columns`): a missing
    column would silently blank the server's value, so it is a :class:`ValueError`.
    """
    getter = itemgetter(*spec.columns)
    ncols = len(spec.columns)

    def values_of(rows: Iterable[Mapping[str, Any]]) -> Iterator[Sequence[Any]]:
        for row in rows:
            try:
                values = getter(row)
            except KeyError:
                values = None
            if values is None or len(row) != ncols:
                missing = sorted(set(spec.columns) - set(row.keys()))
                extra = sorted(set(row.keys()) - set(spec.columns))
                raise ValueError(
                    f"{spec.name} row: missing columns {missing}, unknown columns {extra}"
                )
            yield values

    return prepare_values(spec, device_id, values_of(rows))


def prepare_values(
    spec: TableSpec, device_id: str, rows: Iterable[Sequence[Any]]
) -> list[tuple[Any, ...]]:
    """Like :func:`prepare_rows`, for rows given as values in :attr:`TableSpec.columns`
    order (the shipper reads them so: no dict per row)."""
    if not isinstance(device_id, str) or not device_id:
        raise ValueError("device_id must be a non-empty string")
    ncols = len(spec.columns)
    conv = _converters(spec)
    key_at = [spec.columns.index(c) for c in spec.key]
    out: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for values in rows:
        if len(values) != ncols:
            raise ValueError(f"{spec.name} row: {len(values)} values for {ncols} columns")
        if conv:
            values = list(values)
            for i, fn in conv:
                values[i] = fn(values[i])
        out[tuple(values[i] for i in key_at)] = (device_id, *values)
    return list(out.values())


def _stage(spec: TableSpec) -> sql.Identifier:
    return sql.Identifier(f"r2d2_stage_{spec.name}")


def _upsert_sql(spec: TableSpec) -> sql.Composed:
    cols = sql.SQL(", ").join(map(sql.Identifier, ("device_id", *spec.columns)))
    key = sql.SQL(", ").join(map(sql.Identifier, ("device_id", *spec.key)))
    target = sql.Identifier(spec.name)
    updated = [sql.Identifier(c) for c in spec.updated]
    sets = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=c) for c in updated)
    old = sql.SQL(", ").join(sql.SQL("{t}.{c}").format(t=target, c=c) for c in updated)
    new = sql.SQL(", ").join(sql.SQL("EXCLUDED.{c}").format(c=c) for c in updated)
    return sql.SQL(
        "INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage}"
        " ON CONFLICT ({key}) DO UPDATE SET {sets}"
        " WHERE ({old}) IS DISTINCT FROM ({new})"
    ).format(target=target, cols=cols, stage=_stage(spec), key=key, sets=sets, old=old, new=new)


def _spec(table: str) -> TableSpec:
    spec = TABLES.get(table)
    if spec is None:
        raise ValueError(f"unknown table {table!r}; shipped tables: {', '.join(TABLES)}")
    return spec


def upsert_rows(conn: psycopg.Connection, table: str, device_id: str,
                rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert ``rows`` of ``table`` for ``device_id`` in one transaction; returns the number
    of distinct rows sent. ``conn`` must be in autocommit mode (each batch its own
    transaction). psycopg errors propagate after the rollback."""
    spec = _spec(table)
    return _upsert(conn, spec, prepare_rows(spec, device_id, rows))


def upsert_values(conn: psycopg.Connection, table: str, device_id: str,
                  rows: Iterable[Sequence[Any]]) -> int:
    """:func:`upsert_rows` for rows given as values in the table's column order."""
    spec = _spec(table)
    return _upsert(conn, spec, prepare_values(spec, device_id, rows))


def _upsert(conn: psycopg.Connection, spec: TableSpec, prepared: list[tuple[Any, ...]]) -> int:
    if not prepared:
        return 0
    cols = sql.SQL(", ").join(map(sql.Identifier, ("device_id", *spec.columns)))
    with conn.transaction(), conn.cursor() as cur:
        # Temp tables live for the connection; ON COMMIT DELETE ROWS empties it per batch.
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target}) ON COMMIT DELETE ROWS"
            ).format(stage=_stage(spec), target=sql.Identifier(spec.name))
        )
        with cur.copy(sql.SQL("COPY {stage} ({cols}) FROM STDIN").format(
            stage=_stage(spec), cols=cols
        )) as copy:
            for values in prepared:
                copy.write_row(values)
        cur.execute(_upsert_sql(spec))
    return len(prepared)
