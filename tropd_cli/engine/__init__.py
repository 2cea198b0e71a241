"""The distillation engine: rollouts, scoring, objectives and the training loop."""
