"""The OpenAI dialect: chat completions and models, in OpenAI's JSON and SSE, with OpenAI's errors."""
