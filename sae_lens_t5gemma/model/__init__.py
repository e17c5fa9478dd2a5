"""The hooked T5Gemma 2 model: sites, sizes, dtypes, conventions, hook routing, splicing and steering."""
