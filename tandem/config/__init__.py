"""The one config schema, split by part: `schema` (the run: model, data, algorithm, rollout,
optim, trainer, reward, eval), `cluster` (topology), `checks` (errors and range checks),
`compose` (Hydra: conf/ -> these dataclasses, unknown keys refused)."""
