"""CountTokens' answer: the deployment's own count where its provider has one (TokenCounter), else an estimate.

The estimate, for providers that cannot count (Bedrock, OpenAI-compatible upstreams), is the one the core already
makes of a prompt no provider counted (a cancelled request's usage, a rate limit's reservation): `prompt_estimate`
in services/policy/gate.py, about four characters a token plus the chat template's tokens per message and a bound
per image. An estimate is marked as one (`estimated`), never passed off as the upstream's count, and a provider that
counts but fails is an error, never silently an estimate.
"""

from __future__ import annotations

from modelmax.v1 import completion_pb2 as pb
from services.policy.gate import prompt_estimate
from services.providers import Provider, TokenCounter


async def count_tokens(provider: Provider, params: pb.CompletionParams) -> tuple[int, bool]:
    """(input tokens, whether they are the estimate) for `params` on `provider`."""
    if isinstance(provider, TokenCounter):
        return await provider.count_tokens(params), False
    return prompt_estimate(params), True
