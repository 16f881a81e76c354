"""Infer's `format` as a grammar: what is refused, and what the daemon loads to make one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rbeed import grammar
from rbeed.grammar import LARGEST_BOUND, MOST_OPTIONAL, gbnf


def test_json_is_llamacpps_grammar_of_an_object_and_a_schema_becomes_rules_for_its_fields():
    assert gbnf("json").lstrip().startswith("root   ::= object")
    rules = gbnf({"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]})
    assert '"\\"city\\""' in rules and '"\\"Paris\\""' in rules and '"\\"Rome\\""' in rules


def test_annotations_and_fields_named_like_constraints_are_taken():
    # Only a schema's own keywords are constraints: `minimum` here is a property's name.
    rules = gbnf({"title": "T", "description": "d", "$schema": "https://json-schema.org/draft/2020-12/schema",
                  "type": "object", "properties": {"minimum": {"type": "number", "description": "lowest"}},
                  "$defs": {"when": {"type": "string", "format": "date"}}})  # fmt: skip
    assert '"\\"minimum\\""' in rules and "number" in rules


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "integer", "minimum": 0}, "cannot hold the output to 'minimum'"),
    ({"properties": {"tags": {"type": "array", "uniqueItems": True}}}, "cannot hold the output to 'uniqueItems'"),
    ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "cannot hold the output to 'not'"),
    ({"$defs": {"n": {"type": "number", "multipleOf": 5}}}, "cannot hold the output to 'multipleOf'"),
    ({"items": {"type": "string", "maxLength": LARGEST_BOUND + 1}}, f"maxLength {LARGEST_BOUND + 1} goes beyond"),
    ({"prefixItems": [{"type": "array", "minItems": 10**9}]}, "minItems 1000000000 goes beyond"),
    ({"type": "string", "pattern": "^x{3,5000}$"}, "repeats beyond"),
    ({"type": "quaternion"}, "cannot make a grammar of this JSON Schema: Unrecognized schema"),
    ({"properties": {"a": {"properties": dict.fromkeys(map(str, range(60)), {})},
                     "b": {"properties": dict.fromkeys(map(str, range(40)), {})}}},
     "102 optional properties, more than the 100 rbeed takes; list more of them in `required`"),
    ({"prefixItems": [{"type": "string", "maxLength": LARGEST_BOUND}] * 200}, "the schema makes a grammar of "),
    ({"$ref": "https://example.com/schema.json"}, "$ref 'https://example.com/schema.json' is not in the schema"),
    ({"dependencies": {"a": ["b"]}}, "cannot hold the output to 'dependencies'"),
    # llama-cpp-python's converter would make an empty object of the first and drop the second's allOf.
    ({"allOf": [{"type": "integer"}, {"enum": [1, 2]}]}, "takes allOf only as the merge of objects' properties"),
    ({"type": "string", "allOf": [{"maxLength": 3}]}, "takes allOf only as the merge of objects' properties"),
    ({"properties": {"a": {}}, "allOf": [{"properties": {"b": {}}}]}, "takes allOf only as the merge"),
    # A grammar that matched nothing failed in the worker: "the output's grammar does not parse".
    ({"enum": []}, "enum [] allows no value at all"),
    ({"properties": {"a": {"anyOf": []}}}, "anyOf [] allows no value at all"),
])  # fmt: skip
def test_a_schema_the_grammar_cannot_hold_is_refused_naming_format(schema, message):
    with pytest.raises(ValueError, match="^`format`: ") as refused:
        gbnf(schema)
    assert message in str(refused.value)


def test_allof_of_objects_merges_their_properties_and_items_that_allow_anything_keep_their_bounds():
    merged = gbnf({"$defs": {"named": {"properties": {"name": {"type": "string"}}}},
                   "allOf": [{"$ref": "#/$defs/named"}, {"properties": {"age": {"type": "integer"}}}]})  # fmt: skip
    assert '"\\"name\\""' in merged and '"\\"age\\""' in merged
    # As pydantic writes a list[Any]: the converter failed on `items: {}` (KeyError 'prefixItems').
    for anything in ({}, True):
        rules = gbnf({"type": "array", "items": anything, "maxItems": 2})
        assert 'root ::= "[" space (item ("," space item)?)? "]" space' in rules.splitlines()


def test_up_to_the_most_optional_properties_are_taken():
    properties = {f"p{i}": {"type": "integer"} for i in range(MOST_OPTIONAL + 20)}
    rules = gbnf({"type": "object", "properties": properties, "required": list(properties)[:20]})
    assert all(f'"\\"p{i}\\""' in rules for i in range(MOST_OPTIONAL + 20))


def test_a_schema_too_deep_to_convert_is_refused_not_a_crash():
    schema: dict = {}
    inner = schema
    for _ in range(5000):
        inner["items"] = {}
        inner = inner["items"]
    with pytest.raises(ValueError, match="cannot make a grammar of this JSON Schema: maximum recursion depth"):
        gbnf(schema)


def test_a_schema_made_into_a_grammar_again_is_not_converted_again(monkeypatch):
    module = grammar._llama_grammar()
    conversions = []
    convert = module.json_schema_to_gbnf
    monkeypatch.setattr(module, "json_schema_to_gbnf", lambda text: conversions.append(text) or convert(text))
    schema = {"type": "object", "properties": {"again": {"type": "integer"}}, "required": ["again"]}
    assert gbnf(schema) == gbnf(dict(schema)) and '"\\"again\\""' in gbnf(schema)
    assert len(conversions) == 1  # as when infer is decoded, then run


def test_making_a_grammar_does_not_load_libllama_into_the_daemon():
    code = ("import sys; from rbeed.grammar import gbnf; gbnf({'type': 'boolean'}); gbnf('json'); "
            "print(sorted(name for name in sys.modules if name.startswith('llama_cpp')))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
