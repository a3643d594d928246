"""BabyAI for TorchRL: levels, mission tokenizer, the bounded bot, envs, the policy and demos.

Builds on :mod:`mop_torchrl.core`; knows nothing of training loops. The gymnasium wrappers
(:mod:`~mop_torchrl.babyai.wrappers`), the TorchRL envs (:mod:`~mop_torchrl.babyai.envs`) and
the bot import minigrid; :mod:`~mop_torchrl.babyai.levels`, :mod:`~mop_torchrl.babyai.semantics`
(mission types, step events) and :mod:`~mop_torchrl.babyai.policy` do not.
"""
