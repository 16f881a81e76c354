"""Grammars that hold infer's output to JSON: a JSON object, or a value of a given JSON Schema."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from types import ModuleType

# A schema's length and count bounds become that many nested rules, which llama.cpp parses by
# recursion in the worker: unbounded, one request could exhaust its stack or the daemon's memory.
LARGEST_BOUND = 1000
# The converter's work grows with the square of an object's optional properties (it writes out
# which may follow which), and a grammar goes to the worker in one frame: both are kept small.
MOST_OPTIONAL = 100
LARGEST_GRAMMAR = 1 << 20
_BOUNDS = ("minItems", "maxItems", "minLength", "maxLength")
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")
# Constraints that llama-cpp-python's converter leaves out of the grammar: refused rather than
# ignored, so that no client takes for checked what is not.
_UNENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "contains",
    "not", "if", "then", "else", "unevaluatedItems", "unevaluatedProperties", "dependencies",
})  # fmt: skip
# Any JSON value, as the converter takes it (it fails on `{}` as `items`).
_ANY = {"type": ["object", "array", "string", "number", "boolean", "null"]}
# The converter merges allOf's parts as objects' properties, and only where nothing else (a type,
# properties of its own, a union) comes first: elsewhere it would drop them.
_BEFORE_ALL_OF = frozenset({"$ref", "oneOf", "anyOf", "const", "enum", "properties", "additionalProperties"})
# Where a schema holds schemas: by name, in a list, or as one (`items` as a list: an older prefixItems).
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")


class _Refused(ValueError):
    """A schema refused before it reaches the converter, with a message of rbeed's."""


@functools.cache
def _llama_grammar() -> ModuleType:
    """llama-cpp-python's grammar module, loaded on its own: it is pure Python, while importing
    the package loads libllama, which the daemon otherwise never needs."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("`format` needs llama-cpp-python, which is not installed")
    path = f"{spec.submodule_search_locations[0]}/llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("rbeed._llama_grammar", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def gbnf(format: str | dict) -> str:
    """The GBNF grammar for infer's `format`: "json" (a JSON object) or a JSON Schema.

    ValueError, with a message naming `format`, for a schema that cannot be made into one.
    """
    if format == "json":
        return _llama_grammar().JSON_GBNF
    try:
        return _from_schema(json.dumps(format))
    except _Refused:
        raise
    except (AssertionError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise ValueError(f"`format`: cannot make a grammar of this JSON Schema: {exc}") from None


# Infer's check when it is decoded and the job that runs it want the same grammar: made once.
@functools.lru_cache(maxsize=4)
def _from_schema(text: str) -> str:
    schema = json.loads(text)
    if (optional := _check(schema)) > MOST_OPTIONAL:
        raise _Refused(f"`format`: {optional} optional properties, more than the {MOST_OPTIONAL} rbeed takes; "
                       "list more of them in `required`")  # fmt: skip
    grammar = _llama_grammar().json_schema_to_gbnf(json.dumps(schema))
    if len(grammar) > LARGEST_GRAMMAR:
        raise _Refused(f"`format`: the schema makes a grammar of {len(grammar)} bytes, more than the "
                       f"{LARGEST_GRAMMAR} rbeed takes; lower its length and count bounds")  # fmt: skip
    return grammar


def _check(schema: object) -> int:
    """Refuse what the grammar would not hold the output to, or could not hold at all; the
    number of optional properties the schema has. `items` that allow anything (`{}`, as pydantic
    writes a list[Any]) are written out as any JSON value, where the converter would fail on them."""
    if not isinstance(schema, dict):
        return 0  # true, false or not a schema: the converter judges
    if unenforced := sorted(schema.keys() & _UNENFORCED):
        raise _Refused(f"`format`: rbeed's grammar cannot hold the output to {unenforced[0]!r}; leave it out")
    if "allOf" in schema and not _merges_objects(schema):
        raise _Refused("`format`: rbeed's grammar takes allOf only as the merge of objects' properties (each part "
                       "with properties or a $ref, and no properties, union or $ref beside it); write the schema out")
    if schema.get("items") is True or schema.get("items") == {}:
        schema["items"] = _ANY
    if empty := [key for key in ("enum", "anyOf", "oneOf") if schema.get(key) == []]:
        raise _Refused(f"`format`: {empty[0]} [] allows no value at all, so no output could meet the schema")
    if isinstance(ref := schema.get("$ref"), str) and not ref.startswith("#"):
        raise _Refused(f"`format`: $ref {ref!r} is not in the schema; rbeed fetches none")
    for key in _BOUNDS:
        if isinstance(bound := schema.get(key), int) and bound > LARGEST_BOUND:
            raise _Refused(f"`format`: {key} {bound} goes beyond {LARGEST_BOUND}, the largest bound rbeed takes")
    if isinstance(pattern := schema.get("pattern"), str):
        if any(int(n) > LARGEST_BOUND for bounds in _QUANTIFIER.findall(pattern) for n in bounds if n):
            raise _Refused(f"`format`: pattern {pattern!r} repeats beyond {LARGEST_BOUND}, the largest bound rbeed takes")
    properties, required = schema.get("properties"), schema.get("required")
    optional = 0
    if isinstance(properties, dict):
        optional = len(properties.keys() - set(required if isinstance(required, list) else []))
    return optional + sum(_check(subschema) for subschema in _subschemas(schema))


def _merges_objects(schema: dict) -> bool:
    def object_part(part: object) -> bool:
        return isinstance(part, dict) and ("properties" in part or "$ref" in part)

    parts = schema["allOf"]
    return (isinstance(parts, list) and schema.get("type") in (None, "object") and not schema.keys() & _BEFORE_ALL_OF
            and all(object_part(part) or (isinstance(part, dict) and isinstance(part.get("anyOf"), list)
                                          and all(map(object_part, part["anyOf"]))) for part in parts))  # fmt: skip


def _subschemas(schema: dict) -> list:
    found = []
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            found += value.values()
        elif key in _SCHEMA_LISTS + _SCHEMA_ONE and isinstance(value, list):
            found += value
        elif key in _SCHEMA_ONE:
            found.append(value)
    return found
