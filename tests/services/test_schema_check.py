"""services/providers/schema_check.py: strict schemas checked once, and the model's JSON checked against them."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError
from services.providers.schema_check import PROBLEM_LIMIT, SchemaCheck, SchemaMismatch, mismatch_error

R = pb.ErrorReason
FIELD = "response_format.schema"
DRAFT_07 = "http://json-schema.org/draft-07/schema#"
# What the openai SDK sends for a pydantic model with a nested one (to_strict_json_schema): $defs and local $refs.
PYDANTIC_SCHEMA = {
    "$defs": {
        "City": {
            "properties": {"name": {"title": "Name", "type": "string"}},
            "required": ["name"],
            "title": "City",
            "type": "object",
            "additionalProperties": False,
        }
    },
    "properties": {"city": {"$ref": "#/$defs/City"}, "celsius": {"title": "Celsius", "type": "number"}},
    "required": ["city", "celsius"],
    "title": "WeatherReport",
    "type": "object",
    "additionalProperties": False,
}


def check(schema: dict[str, Any]) -> SchemaCheck:
    return SchemaCheck(schema, field=FIELD, provider="bedrock")


def problem(schema: dict[str, Any], text: str) -> str | None:
    """How `text` breaks `schema`, as the caller would read it; None when it matches."""
    try:
        check(schema).check_text(text, "the structured answer")
    except SchemaMismatch as exc:
        return str(exc)
    return None


def refusal(schema: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as raised:
        check(schema)
    assert (raised.value.reason, raised.value.field, raised.value.provider) == (
        R.ERROR_REASON_INVALID_REQUEST,
        FIELD,
        "bedrock",
    )
    assert raised.value.message.startswith(f"'{FIELD}' is not a valid JSON Schema (needed for strict: true): ")
    return raised.value


def test_a_matching_answer_passes_and_a_mismatch_says_where() -> None:
    assert problem(PYDANTIC_SCHEMA, '{"city": {"name": "Paris"}, "celsius": 18.5}') is None
    assert problem(PYDANTIC_SCHEMA, '{"city": {"name": 7}, "celsius": 18.5}') == (
        f"the structured answer does not match '{FIELD}' at $.city.name: 7 is not of type 'string'"
    )  # through the $ref
    assert problem(PYDANTIC_SCHEMA, '{"city": {"name": "Paris"}}') == (
        f"the structured answer does not match '{FIELD}' at $: 'celsius' is a required property"
    )


@pytest.mark.parametrize("text", ["", "Sorry, I cannot.", '{"celsius": NaN}', '{"celsius": 1} trailing', "{"])
def test_text_that_is_not_json_never_matches(text: str) -> None:
    assert problem({"type": "object"}, text) == "the structured answer is not JSON text"


def test_a_value_nested_too_deeply_to_check_never_matches() -> None:
    recursive = {"type": "array", "items": {"$ref": "#"}}
    assert problem(recursive, "[" * 50 + "]" * 50) is None
    for depth in (900, 100_000):  # past the validator's recursion, then past json's own
        assert problem(recursive, "[" * depth + "]" * depth) == "the structured answer is nested too deeply to check"


def test_without_schema_the_dialect_is_draft_2020_12_and_a_schema_may_name_its_own() -> None:
    # Tuples: `prefixItems` in 2020-12, an `items` array (with `additionalItems`) in draft-07.
    tuple_2020 = {"type": "array", "prefixItems": [{"type": "string"}], "items": False}
    assert problem(tuple_2020, '["a"]') is None
    assert problem(tuple_2020, '["a", 1]') is not None
    tuple_07 = {"$schema": DRAFT_07, "type": "array", "items": [{"type": "string"}], "additionalItems": False}
    assert problem(tuple_07, '["a"]') is None
    assert problem(tuple_07, '["a", 1]') is not None
    # The draft-07 tuple is no valid 2020-12 schema: without its $schema it is refused, not misread.
    without_dialect = {key: value for key, value in tuple_07.items() if key != "$schema"}
    assert "at $.items: " in refusal(without_dialect).message


def test_format_is_an_annotation_as_draft_2020_12_says() -> None:
    assert problem({"type": "string", "format": "email"}, '"not an address"') is None


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "strin"}, "at $.type: 'strin' is not valid under any of the given schemas"),
        ({"type": "object", "required": "city"}, "at $.required: 'city' is not of type 'array'"),
        ({"type": "string", "pattern": "(unclosed"}, "at $.pattern: '(unclosed' is not a 'regex'"),
        ({"$schema": "https://example.com/dialect"}, "'$schema' 'https://example.com/dialect' is not a JSON Schema"),
        ({"$schema": 2020}, "'$schema' 2020 is not a JSON Schema dialect the gateway knows."),
        ({"properties": {"a": {"$ref": "#/$defs/A"}}}, "the reference '#/$defs/A' does not resolve inside the schema."),
        ({"items": {"$ref": "other.json"}}, "the reference 'other.json' does not resolve inside the schema."),
        (json.loads('{"not": ' * 400 + "{}" + "}" * 400), "it is nested too deeply."),
    ],
    ids=["unknown-type", "wrong-keyword-type", "bad-regex", "unknown-dialect", "dialect-not-a-string",
         "dangling-pointer", "dangling-relative", "too-deep"],
)  # fmt: skip
def test_a_schema_that_is_not_valid_is_refused_once_up_front(schema: dict[str, Any], says: str) -> None:
    assert says in refusal(schema).message


def test_references_resolve_from_the_base_uri_where_they_stand() -> None:
    schema = {
        "$id": "https://schemas.example/report",
        "type": "object",
        "properties": {
            "place": {
                "$id": "place",  # https://schemas.example/place: its own "#/..." pointers start here
                "$defs": {"Name": {"type": "string"}},
                "$ref": "#/$defs/Name",
            },
            "again": {"$ref": "place"},
            "tree": {"$ref": "#/$defs/Node"},
        },
        "$defs": {
            "Node": {"$dynamicAnchor": "node", "type": "array", "items": {"$dynamicRef": "#node"}},
        },
    }
    assert problem(schema, '{"place": "Paris", "again": "Rome", "tree": [[], [[]]]}') is None
    assert problem(schema, '{"again": 3}') is not None
    assert problem(schema, '{"tree": [1]}') is not None


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port that would see any connection attempt (accept() finds it pending)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server


def test_a_remote_reference_is_refused_and_never_fetched(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}/city.json"
    message = refusal({"type": "object", "properties": {"city": {"$ref": url}}}).message
    assert f"the reference '{url}' does not resolve inside the schema." in message
    with pytest.raises(BlockingIOError):  # nobody connected
        listener.accept()


def test_references_to_the_published_meta_schemas_resolve_offline() -> None:
    schema = {"type": "object", "properties": {"schema": {"$ref": "https://json-schema.org/draft/2020-12/schema"}}}
    assert problem(schema, '{"schema": {"type": "string"}}') is None
    assert problem(schema, '{"schema": {"type": 5}}') is not None


def test_a_long_explanation_is_cut() -> None:
    said = problem({"enum": ["a"]}, json.dumps("x" * 5000))
    assert said is not None and said.endswith("...")
    assert len(said) == len(f"the structured answer does not match '{FIELD}' at $: ") + PROBLEM_LIMIT


def test_a_mismatch_is_the_upstreams_protocol_error() -> None:
    error = mismatch_error(SchemaMismatch("tool call 0 is not JSON text"), model="deepseek-v3.2", provider="bedrock")
    assert (error.reason, error.provider, error.field) == (R.ERROR_REASON_UPSTREAM_PROTOCOL, "bedrock", "")
    assert error.message == (
        "The model's answer for 'deepseek-v3.2' did not match the schema (strict: true), so it is not passed on: "
        "tool call 0 is not JSON text"
    )
