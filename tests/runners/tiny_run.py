"""Overrides that shrink the whole recipe (pretraining, demos, SFT, RL, evaluation) to seconds:
a small TinyVLA, 8 envs, 16-step episodes, one evaluation episode per train task."""

TINY_RUN_OVERRIDES = [
    "env.num_envs=8", "progress=false",
    "model.kwargs={width: 32, depth: 1, heads: 2, conv_channels: [8, 16], value_hidden: 32}",
    "pretrain.steps=2", "pretrain.num_envs=4", "pretrain.warmup_steps=1",
    "demos.episodes_per_task=1", "sft.steps=3", "sft.batch_size=8",
    "rl.ppo.update_epochs=1", "rl.ppo.num_minibatches=2",
    "eval.num_envs=72", "eval.episodes_per_task=1", "eval.splits=[train]", "eval.videos=0",
    "env.kwargs={max_episode_steps: 16}"]
