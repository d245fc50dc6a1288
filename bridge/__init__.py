"""ModelMax bridge: the OpenAI-compatible REST front door, translating JSON/SSE to and from the core's gRPC API."""
