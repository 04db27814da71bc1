"""The toy world: procedural scenes and clips, the tiny self-trained SD1.5-architecture model, metrics and
the benchmark. Nothing heavy is imported here (the pack imports only toy.model, through the loader node)."""
