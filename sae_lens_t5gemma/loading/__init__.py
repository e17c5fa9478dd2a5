"""Loading SAEs: the release registry, the mindchain format, Gemma Scope 2, conversion and inspection."""
