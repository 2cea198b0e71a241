"""The offline toy lab: tokenizer, tasks, tiny models and the builder of the shipped checkpoints."""
