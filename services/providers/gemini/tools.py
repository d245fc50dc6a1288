"""Function calling on Gemini, without the SDK: tools and tool_choice as function declarations and a calling mode,
tool calls and tool results in the history as functionCall and functionResponse parts, and the ids callers see for
Gemini's calls, which carry its thought signatures.

Tool calls. Gemini's functionCall carries `args` as an object and may carry no `id`; OpenAI callers see `arguments` as
compact JSON text and always an id, synthesised as `call_<24 hex>` when Gemini sent none. A tool message does not name
its function, so its functionResponse takes the name of the assistant tool call with that id earlier in the history;
its `response` is the content parsed as JSON when that is an object, else `{"result": <content as text>}`. A failed
tool (`is_error`) answers `{"error": <content as text>}`, the key Gemini's docs give for a function's error details.

Thought signatures. Gemini 3 attaches an opaque `thoughtSignature` to a functionCall part (the first one, when there are
several) and refuses a history that lacks it (400, or MISSING_THOUGHT_SIGNATURE). OpenAI clients round-trip only a
call's id, name and arguments, so the signature travels inside the id the caller sees:

    <base>~ts~<signature, base64url without padding>      (just <base> when Gemini sent no signature)

where <base> is Gemini's own functionCall.id, or `call_<24 hex>` when it sent none. On the way back the signature is
restored onto the functionCall part, and the id Gemini sent (none when <base> is a synthesised one) onto the call and
onto the functionResponse that answers it, so Gemini sees its parts exactly as it wrote them. Ids the gateway did
not mint (another provider's, a client's) pass through unchanged.

Calls Gemini did not sign. A history that began on another model, a call a client wrote itself, or one made by Gemini
2.5 carries no signature, and Gemini 3 refuses a current-turn step whose first functionCall part has none ("Function
call is missing a thought_signature"). Google documents a placeholder for exactly this case, which skips the check:
`skip_thought_signature_validator` (the Gemini API's thought-signature FAQ also lists
`context_engineering_is_the_way_to_go`; Vertex AI documents only the first, so the gateway sends that one, on both).
For Gemini 3 models (upstream names starting `gemini-3`), the first functionCall part of every model turn that has no
signature of its own gets the placeholder, as the bytes of that text (what google-genai users write,
`thought_signature=b"skip_thought_signature_validator"`; the SDK sends them base64-encoded). Later calls of the same
turn stay unsigned, as Gemini leaves them itself. Gemini validates only the current turn, but earlier turns get the
placeholder too: it is harmless there, and it spares guessing where the current turn begins when a tool result and new
user text share one user turn. Other models never see it: they do not require signatures.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from services.providers.gemini.errors import invalid

# Ids the gateway synthesised for function calls Gemini sent without one; never sent back to Gemini.
_SYNTHESISED_ID = re.compile(r"call_[0-9a-f]{24}")
_SIGNATURE_MARK = "~ts~"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# Google's documented thoughtSignature for function calls Gemini did not make (see the module doc).
PLACEHOLDER_SIGNATURE = b"skip_thought_signature_validator"


def mint_call_id(upstream_id: str | None, signature: bytes | None) -> str:
    """The id callers see for a function call: Gemini's id (or a synthesised one), plus its thought signature."""
    call_id = upstream_id or f"call_{secrets.token_hex(12)}"
    if signature:
        call_id += _SIGNATURE_MARK + base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
    return call_id


def restore_call_id(call_id: str) -> tuple[str | None, bytes | None]:
    """(the id to send Gemini, or None; the thought signature, or None) for an id a caller sent back."""
    base, mark, encoded = call_id.rpartition(_SIGNATURE_MARK)
    signature = None
    if mark and _BASE64URL.fullmatch(encoded):
        try:
            signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):  # a length no base64 text has: not one the gateway minted
            signature = None
    if signature is None:
        base = call_id
    return (None if not base or _SYNTHESISED_ID.fullmatch(base) else base), signature


def needs_thought_signatures(model: str) -> bool:
    """Whether the upstream `model` (such as "models/gemini-3-pro-preview") refuses unsigned function calls."""
    return model.rpartition("/")[2].lower().startswith("gemini-3")


def sign_unsigned_calls(contents: list[dict[str, Any]]) -> None:
    """Gives the first functionCall part of each model turn the placeholder signature, unless it has one."""
    for content in contents:
        if content["role"] != "model":
            continue
        first = next((part for part in content["parts"] if "functionCall" in part), None)
        if first is not None and "thoughtSignature" not in first:
            first["thoughtSignature"] = PLACEHOLDER_SIGNATURE


def function_call_part(call: pb.ToolCall, where: str) -> dict[str, Any]:
    """A model-turn functionCall part, with the id and thought signature Gemini gave it (see the module doc)."""
    upstream_id, signature = restore_call_id(call.id)
    function_call: dict[str, Any] = {"name": call.name, "args": _arguments(call.arguments, where)}
    if upstream_id is not None:
        function_call["id"] = upstream_id
    part: dict[str, Any] = {"functionCall": function_call}
    if signature is not None:
        part["thoughtSignature"] = signature
    return part


def _arguments(arguments: str, where: str) -> dict[str, Any]:
    """A tool call's arguments as the object Gemini wants; empty text means no arguments."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise invalid("A tool call's arguments must be the JSON text of an object.", f"{where}.arguments")
    return value


def function_response_part(message: pb.Message, index: int, names: Mapping[str, str]) -> dict[str, Any]:
    """A user-turn functionResponse part answering the earlier tool call `message.tool_call_id`; `names` maps the
    ids of the history's tool calls to their functions."""
    name = names.get(message.tool_call_id)
    if name is None:
        raise invalid(
            f"The tool message answers tool call {message.tool_call_id!r}, which no earlier assistant message made.",
            f"messages[{index}].tool_call_id",
        )
    text = message.content
    for part_index, part in enumerate(message.parts):
        if part.HasField("image"):
            raise invalid("Gemini takes images only in user messages.", f"messages[{index}].parts[{part_index}]")
        text += part.text
    function_response: dict[str, Any] = {"name": name, "response": _response(text, message.is_error)}
    upstream_id, _ = restore_call_id(message.tool_call_id)
    if upstream_id is not None:
        function_response["id"] = upstream_id
    return {"functionResponse": function_response}


def _response(text: str, is_error: bool) -> dict[str, Any]:
    """A functionResponse's `response`: the error text under "error", the content's JSON object, or the text."""
    if is_error:
        return {"error": text}
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"result": text}


def arguments_text(args: Mapping[str, Any] | None) -> str:
    """A functionCall's args as the compact JSON text OpenAI callers get."""
    return json.dumps(dict(args or {}), ensure_ascii=False, separators=(",", ":"))


_MODES = {
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_UNSPECIFIED: "AUTO",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_AUTO: "AUTO",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE: "NONE",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED: "ANY",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION: "ANY",
}


def tool_config(params: pb.CompletionParams) -> dict[str, Any]:
    """tools (one Tool of function declarations) and toolConfig.functionCallingConfig, as config fields.

    OpenAI's `strict` asks for arguments that match the schema: Gemini's VALIDATED mode (calls made with constrained
    decoding) where the model may choose; ANY constrains its calls already.
    """
    mode = params.tool_choice.mode if params.HasField("tool_choice") else None
    if not params.tools:
        if mode in (pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED, pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION):
            raise invalid("'tool_choice' asks for a tool call, but the request has no 'tools'.", "tool_choice")
        return {}  # "none" or "auto" with nothing to call: honoured as they are
    declarations = [_declaration(tool, index) for index, tool in enumerate(params.tools)]
    config: dict[str, Any] = {"tools": [{"function_declarations": declarations}]}
    calling: dict[str, Any] = {}
    if mode is not None:
        calling["mode"] = _MODES[mode]
    if mode == pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION:
        if params.tool_choice.name not in {tool.name for tool in params.tools}:
            raise invalid(f"'tool_choice' names {params.tool_choice.name!r}, which is not in 'tools'.", "tool_choice")
        calling["allowed_function_names"] = [params.tool_choice.name]
    if calling.get("mode", "AUTO") == "AUTO" and any(tool.strict for tool in params.tools):
        calling["mode"] = "VALIDATED"
    if calling:
        config["tool_config"] = {"function_calling_config": calling}
    return config


def _declaration(tool: pb.Tool, index: int) -> dict[str, Any]:
    """One functionDeclaration; the parameters go as JSON Schema (parametersJsonSchema), exactly as given."""
    declaration: dict[str, Any] = {"name": tool.name}
    if tool.description:
        declaration["description"] = tool.description
    if tool.parameters:
        declaration["parameters_json_schema"] = schema(tool.parameters, f"tools[{index}].parameters")
    return declaration


def schema(text: str, field: str) -> dict[str, Any]:
    """A JSON Schema given as text (a tool's parameters, a response format's schema), as the object Gemini wants."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise invalid("A JSON Schema must be the JSON text of an object.", field)
    return value
