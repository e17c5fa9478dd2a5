"""The controlled comparison with Gemma Scope 2 (Gemma 3): the suite, feature transfer, the report."""
