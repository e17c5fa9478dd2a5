"""Training SAEs on T5Gemma 2 with SAELens' own runners: the plan, the runners, evals and checkpoints."""
