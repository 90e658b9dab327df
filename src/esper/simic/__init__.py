"""Simic: learns Tamiyo's own policy from decision records and field reports, and ships it back.

One module per component, read in this order:

- `settings`: `SimicSettings` (prefix `SIMIC_`): reward weights, PPO, validation, rounds.
- `reward`: the reward of one decision from its field report (accuracy and loss change, counterfactual
  contribution, parameter cost).
- `transitions`: decision records + field reports (from the bus or any iterable) -> transitions ->
  graphs and head choices.
- `ppo`: GAE, the clipped PPO update with per-head credit, explained variance.
- `imitation`: the bootstrap that imitates the heuristic controller.
- `validation`: finite, KL bound, no regression on a held-out replay.
- `updates`: the signed `PolicyUpdate` (safetensors payload with a JSON header).
- `state`: the state directory (current policy, lineage) and a round's record; no PyTorch.
- `records`: `RecordStore`, every record taken off the bus, kept before it is acked (once per command id).
- `trainer`: rounds (`SimicTrainer`), `serve` on the bus.
- `actor_settings`: `ActorSettings` (prefix `ACTOR_`), what actors draw episodes from (the actors
  themselves build runs: `esper.assembly.actor`).
"""
