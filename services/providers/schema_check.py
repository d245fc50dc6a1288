"""OpenAI's `strict: true`, enforced by the gateway for upstreams that cannot promise it (Bedrock's Converse has no
such switch): the model's final JSON is checked against the caller's JSON Schema, provider-neutral.

The checks are the `jsonschema` library's, in the schema's own dialect (`$schema`), Draft 2020-12 when it names
none; `format` is an annotation there, as the draft says, so it is not asserted. A schema is checked once, when
the request is shaped, so a broken one is the caller's 400 naming its field, before any upstream call. `$ref`s
resolve inside the schema (and to the published meta-schemas) only: the gateway never fetches a URL a caller wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jsonschema_specifications
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError

PROBLEM_LIMIT = 300  # characters of jsonschema's explanation that reach the caller (it quotes the model's JSON)
_REFERENCES = ("$ref", "$dynamicRef")


class SchemaMismatch(Exception):
    """The model's final JSON does not match a strict schema; the message says what and where, for the caller, and
    `field` names the schema's field of CompletionParams (which the message quotes)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class SchemaCheck:
    """One strict schema, checked as a schema once, and the validator of the answers that must match it.

    `field` names the schema in the request, as the path of its field of CompletionParams (`tools[0].parameters`),
    for the caller; `provider` names the adapter in a refusal, as every provider's errors do.
    """

    def __init__(self, schema: dict[str, Any], *, field: str, provider: str) -> None:
        self.field = field
        self._provider = provider
        dialect = schema.get("$schema")
        if dialect is None:
            cls: type[Validator] | None = Draft202012Validator
        else:
            # validator_for returns `default` for an unknown $schema, whatever it is; types-jsonschema types `default`
            # as a validator class only, so None (the gateway's "unknown dialect") needs the ignore.
            cls = validator_for(schema, default=None) if isinstance(dialect, str) else None  # type: ignore[arg-type]
        if cls is None:
            raise self._invalid(f"'$schema' {dialect!r} is not a JSON Schema dialect the gateway knows.")
        try:
            cls.check_schema(schema)
            unresolved = _unresolved_reference(schema)
        except SchemaError as exc:
            raise self._invalid(f"at {exc.json_path}: {_cut(exc.message)}") from exc
        except RecursionError as exc:
            raise self._invalid("it is nested too deeply.") from exc
        if unresolved is not None:
            raise self._invalid(f"the reference {unresolved!r} does not resolve inside the schema.")
        # An empty registry: a reference the schema does not hold fails instead of being fetched (jsonschema's
        # default would fetch it).
        self._validator = cls(schema, registry=referencing.Registry())

    def check_text(self, text: str, subject: str) -> None:
        """Raise SchemaMismatch unless `text` is JSON that matches the schema; `subject` names it for the caller
        ("the structured answer", "tool call 1")."""
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise SchemaMismatch(f"{subject} is not JSON text", self.field) from exc
        except RecursionError as exc:
            raise SchemaMismatch(f"{subject} is nested too deeply to check", self.field) from exc
        try:
            error = best_match(self._validator.iter_errors(value))
        except RecursionError as exc:  # a value nested past what can be checked is never passed on as matching
            raise SchemaMismatch(f"{subject} is nested too deeply to check", self.field) from exc
        except referencing.exceptions.Unresolvable as exc:  # a reference the check above could not foresee
            raise SchemaMismatch(
                f"{subject} cannot be checked: {exc.ref!r} in '{self.field}' does not resolve", self.field
            ) from exc
        if error is not None:
            raise SchemaMismatch(
                f"{subject} does not match '{self.field}' at {error.json_path}: {_cut(error.message)}", self.field
            )

    def _invalid(self, problem: str) -> GatewayError:
        message = f"'{self.field}' is not a valid JSON Schema (needed for strict: true): {problem}"
        reason = pb.ErrorReason.ERROR_REASON_INVALID_REQUEST
        return GatewayError(reason, message, field=self.field, provider=self._provider)


def mismatch_error(exc: SchemaMismatch, *, model: str, provider: str) -> GatewayError:
    """A mismatch as the caller sees it: the model's answer broke the promise of `strict`, the upstream's fault."""
    message = f"The model's answer for '{model}' did not match the schema (strict: true), so it is not passed on: {exc}"
    return GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL, message, field=exc.field, provider=provider)


def _unresolved_reference(schema: Mapping[str, Any]) -> str | None:
    """The first `$ref` or `$dynamicRef` that does not resolve, from the base URI in force where it stands; None when
    all do. Each is tried once here, because validation follows only the ones a given answer reaches."""
    root = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    pending = [(jsonschema_specifications.REGISTRY.resolver_with_root(root), root)]
    while pending:
        resolver, resource = pending.pop()
        if isinstance(resource.contents, Mapping):
            for keyword in _REFERENCES:
                reference = resource.contents.get(keyword)
                if isinstance(reference, str):
                    try:
                        resolver.lookup(reference)
                    except referencing.exceptions.Unresolvable:
                        return reference
        pending.extend((resolver.in_subresource(sub), sub) for sub in resource.subresources())
    return None


def _cut(text: str) -> str:
    return text if len(text) <= PROBLEM_LIMIT else text[: PROBLEM_LIMIT - 3] + "..."


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity, which json.loads accepts and JSON does not
