"""CountTokens' answer: the deployment's own count where its provider has one (TokenCounter), else an estimate.

The estimate, for providers that cannot count (Bedrock, OpenAI-compatible upstreams), is

    input_tokens = ceil(B / 4) + 4 * M + 1600 * I

where B is the UTF-8 bytes of every text the prompt carries (each message's content and text parts, its tool calls'
names and arguments, its reasoning blocks' text; each tool's name, description and parameters schema; the response
format's schema), M the number of messages and I the number of images. Four bytes a token is the usual rule for
English text under BPE tokenizers; four tokens a message stand for the chat template's role markers; 1,600 tokens is
about what a one-megapixel image costs (Anthropic counts width x height / 750). Redacted reasoning is opaque bytes and
is not counted. An estimate is marked as one (`estimated`), never passed off as the upstream's count, and a provider
that counts but fails is an error, never silently an estimate.
"""

from __future__ import annotations

import math

from modelmax.v1 import completion_pb2 as pb
from services.providers import Provider, TokenCounter

BYTES_PER_TOKEN = 4
MESSAGE_TOKENS = 4
IMAGE_TOKENS = 1600


async def count_tokens(provider: Provider, params: pb.CompletionParams) -> tuple[int, bool]:
    """(input tokens, whether they are the estimate) for `params` on `provider`."""
    if isinstance(provider, TokenCounter):
        return await provider.count_tokens(params), False
    return estimate_tokens(params), True


def estimate_tokens(params: pb.CompletionParams) -> int:
    """The formula of the module doc."""
    texts: list[str] = []
    images = 0
    for message in params.messages:
        texts.append(message.content)
        for part in message.parts:
            if part.HasField("image"):
                images += 1
            else:
                texts.append(part.text)
        for call in message.tool_calls:
            texts += (call.name, call.arguments)
        texts += (block.text for block in message.reasoning)
    for tool in params.tools:
        texts += (tool.name, tool.description, tool.parameters)
    texts.append(params.response_format.schema)
    octets = sum(len(text.encode()) for text in texts)
    return math.ceil(octets / BYTES_PER_TOKEN) + MESSAGE_TOKENS * len(params.messages) + IMAGE_TOKENS * images
