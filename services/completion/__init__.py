"""The CompletionService: the servicer, its request checks, the event contract and the unary fold."""
