"""ModelMax core: the gRPC CompletionService and its providers."""
