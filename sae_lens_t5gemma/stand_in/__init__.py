"""The offline stand-in: tiny random models, tokenizer, SAEs and a throwaway hub (tests, demo, --stand-in)."""
