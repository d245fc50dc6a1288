"""POST /v1/chat/completions: the request we accept, its translation to proto, and the relay of its answer."""
