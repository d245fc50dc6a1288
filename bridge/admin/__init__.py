"""The admin API: key self-inspection (`GET /v1/key`) and key management (`/v1/admin/*`), served by the core's
KeyService, in JSON with OpenAI-shaped errors.

The bridge decides nothing here: every request carries the caller's key to the core, which takes any key for
`/v1/key` and only a management key for `/v1/admin/*` (an inference or static key gets 403 `permission_denied`).

Routes (bodies are JSON objects; an unknown or repeated field, a wrong type or an unknown query parameter is a 400
naming its `param`):

    GET    /v1/key                          {"data": <current key>}
    POST   /v1/admin/keys                   201 <key> + {"key": "mm-<id>-<secret>"}   (the whole key, shown once)
    GET    /v1/admin/keys?owner=&include_revoked=true|false      {"object": "list", "data": [<key>...]}
    GET    /v1/admin/keys/<id>              <key>
    PATCH  /v1/admin/keys/<id>              <key> after the change
    DELETE /v1/admin/keys/<id>              <key>, revoked (revocation is final)
    POST   /v1/admin/keys/<id>/rotate       <key> + {"key": "mm-<id>-<new secret>"}   (the old secret stops working)
    GET    /v1/admin/usage?from=&to=&group_by=key|model|day
                                            {"object": "list", "from", "to", "group_by", "data": [<usage row>...]}

A create body: {"name" (required), "owner", "kind": "inference"|"management", "models": [...] (null: every
model), "budget_usd": 5 or "5.00" | "budget_micros": 5000000, "period": "day"|"month"|"total" (default month),
"expires_at": ISO-8601, "rpm", "tpm", "max_concurrent"}; null is the same as leaving a field out. A PATCH body
names only what changes, with the same fields but `kind`; there null clears: `"models": null` is every model,
`"budget_usd": null` no budget, `"expires_at": null` no expiry, `"rpm": null` no limit. A PATCH of only the
amount or only the period keeps the budget's other part.

<key>:

    {"object": "api_key", "id", "name", "owner", "kind": "inference"|"management",
     "status": "active"|"expired"|"revoked", "models": null | ["m", ...],
     "budget": null | {"amount_usd": "5.00", "amount_micros": 5000000, "period": "day"|"month"|"total"},
     "rpm", "tpm", "max_concurrent": null | int, "created_at", "expires_at", "revoked_at": null | ISO-8601 UTC}

<current key> (modelled on OpenRouter's GET /api/v1/key): the <key> fields but "object", plus

    "static": true for a key from the gateway's settings (id "static-<fingerprint>", name "static", every model,
              no budget; "created_at" null),
    "usage": null (no policy store: nothing is metered) | {"period": the budget's, else "month",
             "period_start", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
             "reasoning_tokens", "cost_micros", "cost_usd", "unpriced_requests"},
    "spent_micros", "held_micros", "remaining_micros": null without a budget; else the period's settled spend,
              what requests in flight hold, and what is left (never below 0),
    "limit_remaining": "remaining_micros" as a USD string ("4.50"), OpenRouter's name; null without a budget.

<usage row>: {"group" (key id, model or YYYY-MM-DD), "requests", "prompt_tokens", "cached_tokens",
"completion_tokens", "reasoning_tokens", "cost_micros", "cost_usd", "unpriced_requests"}; the cost is null when no
request of the row had a price (unknown, not 0). `from` is included and `to` excluded; by default from the 1st of
this month (UTC) to now. Dates are YYYY-MM-DD (midnight UTC) or ISO-8601 times (UTC unless they say otherwise).
"""

from __future__ import annotations

from bridge.admin.routes import ADMIN_ROUTES

__all__ = ["ADMIN_ROUTES"]
