"""A small declarative validator for JSON request bodies, and the JSON Schema it implies.

Each `Kind` checks one JSON value and says what it accepts as a JSON Schema fragment, so the
OpenAPI document (`mlxsup.api.spec`) is generated from the same declarations that validate
requests and cannot drift from them. Errors name the field by its path (`prompt[2]`,
`messages[0].role`) and never quote the offending value (it may be huge or deeply nested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from mlxsup.api.errors import ApiError, invalid

_MISSING = object()
MISSING = _MISSING


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Kind:
    """Validates one JSON value; `schema()` describes it for OpenAPI."""

    def check(self, value, path: str):
        raise NotImplementedError

    def schema(self) -> dict:
        raise NotImplementedError


@dataclass
class Integer(Kind):
    minimum: Optional[int] = None
    maximum: Optional[int] = None
    accept_bool: bool = False  # seed clients send `"logprobs": true`

    def check(self, value, path):
        if isinstance(value, bool):
            if self.accept_bool:
                return int(value)
            raise invalid(path, f"{path} must be an integer, not a boolean")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise invalid(path, f"{path} must be an integer, not {_type_name(value)}")
        if self.minimum is not None and value < self.minimum:
            raise invalid(path, f"{path} must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise invalid(path, f"{path} must be <= {self.maximum}")
        return value

    def schema(self):
        s: dict = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.accept_bool:
            s = {"oneOf": [s, {"type": "boolean"}]}
        return s


@dataclass
class Number(Kind):
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(path, f"{path} must be a number, not {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise invalid(path, f"{path} must be a finite number")
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value <= lo if self.exclusive_minimum else value < lo):
            raise invalid(path, f"{path} must be {'>' if self.exclusive_minimum else '>='} {lo:g}")
        if hi is not None and (value >= hi if self.exclusive_maximum else value > hi):
            raise invalid(path, f"{path} must be {'<' if self.exclusive_maximum else '<='} {hi:g}")
        return value

    def schema(self):
        s: dict = {"type": "number"}
        if self.minimum is not None:
            s["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            s["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        return s


@dataclass
class String(Kind):
    max_length: int = 1 << 24
    min_length: int = 0
    choices: Optional[Sequence[str]] = None

    def check(self, value, path):
        if not isinstance(value, str):
            raise invalid(path, f"{path} must be a string, not {_type_name(value)}")
        if self.choices is not None and value not in self.choices:
            raise invalid(path, f"{path} must be one of {', '.join(map(repr, self.choices))}")
        if len(value) > self.max_length:
            raise invalid(path, f"{path} is longer than {self.max_length} characters")
        if len(value) < self.min_length:
            raise invalid(path, f"{path} must not be empty" if self.min_length == 1
                          else f"{path} is shorter than {self.min_length} characters")
        return value

    def schema(self):
        s: dict = {"type": "string"}
        if self.choices is not None:
            s["enum"] = list(self.choices)
        else:
            s["maxLength"] = self.max_length
            if self.min_length:
                s["minLength"] = self.min_length
        return s


@dataclass
class Boolean(Kind):
    def check(self, value, path):
        if not isinstance(value, bool):
            raise invalid(path, f"{path} must be a boolean, not {_type_name(value)}")
        return value

    def schema(self):
        return {"type": "boolean"}


@dataclass
class Null(Kind):
    def check(self, value, path):
        if value is not None:
            raise invalid(path, f"{path} must be null")
        return None

    def schema(self):
        return {"type": "null"}


@dataclass
class Array(Kind):
    item: Kind
    min_items: int = 0
    max_items: int = 1 << 20

    def check(self, value, path):
        if not isinstance(value, list):
            raise invalid(path, f"{path} must be an array, not {_type_name(value)}")
        if len(value) < self.min_items:
            raise invalid(path, f"{path} must not be empty" if self.min_items == 1
                          else f"{path} needs at least {self.min_items} items")
        if len(value) > self.max_items:
            raise invalid(path, f"{path} has more than {self.max_items} items")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def schema(self):
        s = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            s["minItems"] = self.min_items
        s["maxItems"] = self.max_items
        return s


@dataclass
class TokenIds(Kind):
    """A list of token ids; checked with one pass and no per-item error path allocation."""

    min_items: int = 1
    max_items: int = 1 << 20

    def check(self, value, path):
        if not isinstance(value, list):
            raise invalid(path, f"{path} must be an array of token ids, not {_type_name(value)}")
        if len(value) < self.min_items:
            raise invalid(path, f"{path} must not be empty")
        if len(value) > self.max_items:
            raise invalid(path, f"{path} has more than {self.max_items} token ids")
        for i, v in enumerate(value):
            if type(v) is not int or not (0 <= v < 2**31):
                raise invalid(f"{path}[{i}]", f"{path}[{i}] must be a token id (an integer from 0 to 2147483647)")
        return value

    def schema(self):
        return {"type": "array", "items": {"type": "integer", "minimum": 0},
                "minItems": self.min_items, "maxItems": self.max_items}


@dataclass
class AnyOf(Kind):
    """One of several kinds. Options of the value's JSON type are tried in order; when all
    fail, the error that got deepest into the value (the most specific) is raised."""

    options: Sequence[Kind]
    describe: str = ""

    def check(self, value, path):
        errors = []
        for option in self.options:
            if not _same_type(option, value):
                continue
            try:
                return option.check(value, path)
            except ApiError as e:
                errors.append(e)
        if errors:
            # Deepest path first; at equal depth the later position (the option that accepted
            # more items): [1, 2**31] is a bad token id at [1], not a non-string at [0].
            raise max(errors, key=lambda e: (len(e.field), e.field))
        raise invalid(path, f"{path} must be {self.describe or 'of another type'}, not {_type_name(value)}")

    def schema(self):
        return {"anyOf": [o.schema() for o in self.options]}


def _same_type(kind: Kind, value) -> bool:
    """Whether `value` has the JSON type that `kind` validates."""
    if isinstance(kind, Integer):
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) or (kind.accept_bool and isinstance(value, bool)))
    if isinstance(kind, Number):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, String):
        return isinstance(value, str)
    if isinstance(kind, Boolean):
        return isinstance(value, bool)
    if isinstance(kind, Null):
        return value is None
    if isinstance(kind, (Array, TokenIds)):
        return isinstance(value, list)
    if isinstance(kind, Object):
        return isinstance(value, dict)
    if isinstance(kind, AnyOf):
        return any(_same_type(o, value) for o in kind.options)
    return True


@dataclass
class Field:
    kind: Kind
    default: Any = _MISSING  # _MISSING: required
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class Object(Kind):
    """A JSON object with declared fields. Unknown fields are refused unless listed in `ignored`
    (accepted and dropped) or `allow_unknown` is set."""

    fields: dict
    ignored: frozenset = frozenset()
    allow_unknown: bool = False
    name: str = ""
    check_all: Optional[Callable[[dict, str], None]] = None

    def check(self, value, path=""):
        if not isinstance(value, dict):
            where = path or "request body"
            raise invalid(path, f"{where} must be a JSON object, not {_type_name(value)}")
        out = {}
        for key, spec in self.fields.items():
            name = _join(path, key)
            raw = value.get(key, _MISSING)
            if raw is None and not spec.required:
                raw = _MISSING  # an optional field given as null takes its default
            if raw is _MISSING:
                if spec.required:
                    raise invalid(name, f"missing required field {name!r}")
                out[key] = spec.default() if callable(spec.default) else spec.default
                continue
            out[key] = spec.kind.check(raw, name)
        for key in value:
            if key not in self.fields and key not in self.ignored and not self.allow_unknown:
                name = _join(path, key)
                raise invalid(name, f"unknown field {_printable(key)!r}" + _did_you_mean(key, self.fields))
        if self.allow_unknown:
            for key, raw in value.items():
                if key not in self.fields and key not in self.ignored:
                    out[key] = raw
        if self.check_all is not None:
            self.check_all(out, path)
        return out

    def schema(self):
        props = {}
        for key, spec in self.fields.items():
            s = dict(spec.kind.schema())
            if not spec.required and s and s.get("type") != "null":
                s = {"anyOf": [s, {"type": "null"}]}
            if spec.description:
                s["description"] = spec.description
            if not spec.required and not callable(spec.default) and spec.default is not None:
                s["default"] = spec.default
            props[key] = s
        for key in sorted(self.ignored):
            props[key] = {"description": "accepted and ignored (not implemented)"}
        s = {"type": "object", "properties": props}
        required = [k for k, spec in self.fields.items() if spec.required]
        if required:
            s["required"] = required
        if not self.allow_unknown:
            s["additionalProperties"] = False
        return s


def _join(path: str, key: str) -> str:
    key = _printable(key)
    return f"{path}.{key}" if path else key


def _printable(key: str) -> str:
    key = key if len(key) <= 64 else key[:61] + "..."
    return key.encode("unicode_escape").decode("ascii") if not key.isprintable() else key


def _did_you_mean(key: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(key[:64], list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
