"""Parse a call's arguments and check them against the tool's JSON Schema, with short errors the
model can act on ("degrees must be an integer")."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from r2d2voice.appliance.tools.config import one_line

MAX_ARGUMENTS = 64 * 1024
_ARTICLE = {"integer": "an integer", "object": "an object", "array": "an array"}


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A Draft 2020-12 validator for an already checked schema, with format checks."""
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def parse(arguments_json: str) -> dict[str, Any]:
    """The arguments as a dict; ValueError with a short reason. Blank text means ``{}``."""
    if len(arguments_json) > MAX_ARGUMENTS:
        raise ValueError(f"arguments longer than {MAX_ARGUMENTS // 1024} KiB")
    if not arguments_json.strip():
        return {}
    try:
        value = json.loads(arguments_json, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError("arguments must be a JSON object")
    return value


def problem(check: Draft202012Validator, arguments: dict[str, Any]) -> str | None:
    """The most relevant schema violation in one short phrase, or None when valid."""
    error = best_match(check.iter_errors(arguments))
    return None if error is None else explain(error)


def explain(error: ValidationError) -> str:
    """``error`` as "<where> must …": the argument's path and what it must be."""
    where = _where(list(error.absolute_path))
    kind, want, got = error.validator, error.validator_value, error.instance
    if kind == "type":
        types = want if isinstance(want, list) else [want]
        return f"{where} must be {' or '.join(_ARTICLE.get(t, f'a {t}') for t in types)}"
    if kind == "required":
        missing = [name for name in want if isinstance(got, dict) and name not in got]
        return f"{_where([*error.absolute_path, missing[0] if missing else '?'])} is required"
    if kind == "additionalProperties" and isinstance(got, dict):
        known = set(error.schema.get("properties", {}))
        extra = sorted(k for k in got if k not in known) or ["?"]
        return f"unexpected argument {_where([*error.absolute_path, extra[0]])}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
              "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"{where} must be {bounds[kind]} {want}"
    if kind == "enum":
        return f"{where} must be one of {', '.join(json.dumps(v) for v in want)}"
    if kind == "const":
        return f"{where} must be {json.dumps(want)}"
    if kind in ("minLength", "maxLength", "minItems", "maxItems"):
        unit = "characters" if kind.endswith("Length") else "items"
        return f"{where} must have {'at least' if kind.startswith('min') else 'at most'} " \
               f"{want} {unit}"
    if kind == "pattern":
        return f"{where} must match {want}"
    return f"{where}: {one_line(error.message, 120)}"


def _where(path: list[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "arguments"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
