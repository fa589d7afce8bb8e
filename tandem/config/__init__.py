"""The one config schema, split by part: `schema` (the run: model, data, algorithm, rollout,
optim, trainer, reward, eval), `cluster` (topology), `checks` (errors and range checks),
`fit` (budgets against each model's context and the KV cache), `local_model` (what those read
from a local model's config.json), `compose` (Hydra: conf/ -> these dataclasses, unknown keys
refused)."""
