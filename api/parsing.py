"""Request bodies through their pydantic models (`mlxsup.api.protocol`), and pydantic's errors
as the project's error body.

pydantic reports every error with a location and a type; the API answers the first one as
`{"error": {"type": "validation_error", "message", "field"}}` (422), the field named by its
path (`prompt[2]`, `messages[0].role`) and the message in the project's words (pydantic's own
sentences are not the API's contract), never quoting the offending value (it may be huge).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional, TypeVar

from pydantic import BaseModel, ValidationError

from mlxsup.api.errors import ApiError, invalid
from mlxsup.api.protocol import MAX_TOKEN_ID, TAGS, TOKEN_ID_FIELDS, TOKEN_ID_TAGS

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Limits:
    """What request checks need beyond the schema: --max-queue, and the model's vocabulary size
    and context length as the engine published them when it reported ready (None: not known
    yet; the request then waits for a ready engine and is answered 503 before it is sent)."""

    max_queue: Optional[int] = None
    vocab_size: Optional[int] = None
    context_length: Optional[int] = None

    def context(self) -> dict:
        return {"max_queue": self.max_queue, "vocab_size": self.vocab_size}


def parse_body(model: type[M], data, limits: Limits = Limits()) -> M:
    """`data` (parsed JSON) as `model`, or the ApiError for its first error."""
    try:
        return model.model_validate(data, context=limits.context())
    except ValidationError as e:
        raise api_error(e.errors(include_url=False), model) from None


def api_error(errors: list, model: type[BaseModel] = None) -> ApiError:
    return _one(errors[0], model)


def _one(error: dict, model) -> ApiError:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc = error["loc"]
    path = _path(loc)
    value = error.get("input")
    if "field" in ctx:  # a model-level rule names its field (one of prompt / prompt_ids / messages)
        return invalid(ctx["field"], error["msg"])
    if kind == "token_not_in_vocab":
        name = f"{path}[{ctx['index']}]"
        return invalid(name, f"{name} is not a token id of this model (vocabulary size {ctx['vocab_size']})")
    if kind == "missing":
        return invalid(path, f"missing required field {path!r}")
    if kind == "extra_forbidden":
        key = loc[-1] if loc else ""
        return invalid(path, f"unknown field {_printable(str(key))!r}" + _did_you_mean(str(key), model))
    if _is_token_id(loc):
        if kind in ("list_type",):
            return invalid(path, f"{path} must be an array of token ids, not {_type_name(value)}")
        if kind == "too_short":
            return invalid(path, f"{path} must not be empty")
        if kind == "too_long":
            return invalid(path, f"{path} has more than {ctx.get('max_length')} token ids")
        return invalid(path, f"{path} must be a token id (an integer from 0 to {MAX_TOKEN_ID})")
    where = path or "request body"
    message = {
        "one_of": lambda: f"{where} {error['msg']}, not {_type_name(value)}",
        "int_type": lambda: f"{where} must be an integer, not {_type_name(value)}",
        "int_from_float": lambda: f"{where} must be an integer, not a number",
        "float_type": lambda: f"{where} must be a number, not {_type_name(value)}",
        "finite_number": lambda: f"{where} must be a finite number",
        "bool_type": lambda: f"{where} must be a boolean, not {_type_name(value)}",
        "string_type": lambda: f"{where} must be a string, not {_type_name(value)}",
        "list_type": lambda: f"{where} must be an array, not {_type_name(value)}",
        "model_type": lambda: f"{where} must be a JSON object, not {_type_name(value)}",
        "dict_type": lambda: f"{where} must be a JSON object, not {_type_name(value)}",
        "literal_error": lambda: f"{where} must be one of {_choices(ctx.get('expected', ''))}",
        "greater_than_equal": lambda: f"{where} must be >= {_num(ctx.get('ge'))}",
        "greater_than": lambda: f"{where} must be > {_num(ctx.get('gt'))}",
        "less_than_equal": lambda: f"{where} must be <= {_num(ctx.get('le'))}",
        "less_than": lambda: f"{where} must be < {_num(ctx.get('lt'))}",
        "string_too_long": lambda: f"{where} is longer than {ctx.get('max_length')} characters",
        "string_too_short": lambda: (f"{where} must not be empty" if ctx.get("min_length") == 1
                                     else f"{where} is shorter than {ctx.get('min_length')} characters"),
        "too_short": lambda: (f"{where} must not be empty" if ctx.get("min_length") == 1
                              else f"{where} needs at least {ctx.get('min_length')} items"),
        "too_long": lambda: f"{where} has more than {ctx.get('max_length')} items",
    }.get(kind)
    return invalid(path, message() if message else f"{where}: {error['msg']}")


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in TAGS:
            continue
        else:
            part = _printable(part)
            out = f"{out}.{part}" if out else part
    return out


def _is_token_id(loc: tuple) -> bool:
    """Whether the error is inside a token-id list (its own messages say so)."""
    if any(part in TOKEN_ID_TAGS for part in loc if isinstance(part, str)):
        return True
    names = [p for p in loc if isinstance(p, str) and p not in TAGS]
    return len(names) == 1 and names[0] in TOKEN_ID_FIELDS and "~texts" not in loc


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


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _choices(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" as "'a', 'b', 'c'"."""
    return expected.replace(" or ", ", ")


def _printable(key: str) -> str:
    key = key if len(key) <= 64 else key[:61] + "..."
    return key.encode("unicode_escape").decode("ascii") if not key.isprintable() else key


def _did_you_mean(key: str, model) -> str:
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(key[:64], known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["ApiError", "Limits", "api_error", "parse_body"]
