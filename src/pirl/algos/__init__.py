"""RL algorithms for flow-matching policies: advantage estimators, PPO and GRPO losses, SFT.

- :mod:`pirl.algos.advantages`: chunk-level GAE, discounted returns, advantage normalisation.
- :mod:`pirl.algos.ppo`: log-prob aggregation over the denoising chain, clipped policy loss
  (dual clip), clipped / Huber value loss, explained variance, :class:`PPOConfig`.
- :mod:`pirl.algos.grpo`: group-relative advantages, GRPO group assignment, :class:`GRPOConfig`.
- :mod:`pirl.algos.sft`: few-shot flow-matching SFT.
"""

from pirl.algos.advantages import discounted_returns, gae, normalize_advantages
from pirl.algos.grpo import GRPOConfig, broadcast_over_time, group_advantages, make_groups
from pirl.algos.ppo import (PolicyUpdateConfig, PPOConfig, aggregate_logp, approx_kl,
                            explained_variance, level_mask, make_action_mask, policy_loss,
                            value_loss)

__all__ = [
    "GRPOConfig", "PPOConfig", "PolicyUpdateConfig", "aggregate_logp", "approx_kl",
    "broadcast_over_time", "discounted_returns", "explained_variance", "gae",
    "group_advantages", "level_mask", "make_action_mask", "make_groups",
    "normalize_advantages", "policy_loss", "value_loss",
]
