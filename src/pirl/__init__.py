"""pirl: online RL fine-tuning of flow-matching VLA policies in parallel simulation.

Architecture (each folder meets the others only at small typed interfaces):

- ``pirl.models``  VLA policies (:class:`pirl.models.base.FlowPolicy`): prefix encoder + action expert.
- ``pirl.flow``    samplers (ODE, Flow-Noise, Flow-SDE) returning action chunks with exact log-probs.
- ``pirl.algos``   PPO, GRPO, SFT losses and advantage estimators.
- ``pirl.envs``    batched environment API, the built-in tabletop benchmark, simulator adapters.
- ``pirl.runners`` rollout collection, training loops, evaluation.
"""

__version__ = "0.1.0"
