"""BabyAI for TorchRL: levels, mission tokenizer, the bounded bot, envs, the policy and demos.

Builds on :mod:`mop_torchrl.core`; knows nothing of training loops. The envs and the bot import
minigrid; :mod:`mop_torchrl.babyai.levels` and :mod:`mop_torchrl.babyai.policy` do not.
"""
