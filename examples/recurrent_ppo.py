"""Recurrent PPO on a partially observable CartPole or Pendulum, with a MoP, GRU or LSTM core.

    python examples/recurrent_ppo.py --env cartpole --core gru
    python examples/recurrent_ppo.py --env cartpole --core mop --out ppo_mop.json
    python examples/recurrent_ppo.py --core lstm          # masked Pendulum

``--env cartpole``: gymnasium's ``CartPole-v1`` observing the cart position and the pole angle
only (the RL Zoo's ``CartPoleNoVel``); Pendulum: ``Pendulum-v1`` observing ``cos θ, sin θ``
only (``PendulumNoVel``), built by ``masked_control.py`` beside this script (it drops the
velocities, so they have to be inferred from memory). The recipe is the RL Zoo's recurrent PPO
(``hyperparams/ppo_lstm.yml``, sb3-contrib's ``RecurrentPPO``) in TorchRL's parts:
observations normalised by ``VecNorm``, rewards divided by a running std of the discounted
return (``ReturnScaling``, the Zoo's ``VecNormalize``); an actor ``core →
Linear(64)+ReLU → head`` (categorical logits on CartPole; on Pendulum a Normal with gSDE
exploration, :class:`StateDependentNoise`) and a critic with **its own** core
(``enable_critic_lstm``: of the actor's kind; for a MoP actor a GRU on CartPole and the Zoo's
LSTM on Pendulum, ``MOP_CRITIC``); TorchRL's ``ClipPPOLoss`` (value loss 0.5·MSE, gradient norm
0.5) on whole per-env sequences or, on Pendulum, 128-step chunks of them, each replayed from
the states stored at its first step (it enters recurrent mode by itself), with advantages from
``GAE``, which does not: it runs inside ``set_recurrent_mode(True)``. Each task has its own
defaults (``DEFAULTS``); any flag overrides them.

``GAE(..., deactivate_vmap=True)``: a GRU/LSTM critic fails under ``vmap`` in torchrl 0.14.
The routing cost of the loss's own replay (of its MoP cores) is added to the PPO loss in the
plain form ``α·cost`` (``routing_cost_loss(..., mode="plain")``; ``--alpha 0`` disables it):
the paper's scaled form ``α·cost/(ε + L)`` needs a positive performance measure ``L``, and the
PPO total (surrogate + critic + entropy) is not one. The default α is 3e-2 on CartPole (faster
there than 1e-2 and 0, measured) and ``DEFAULT_RL_ALPHA`` (1e-2) on Pendulum. A MoP core is
one block (``--mop_layers 0,32,64``) on CartPole, about the GRU's CPU per frame, and the paper
preset (``0,16,32`` x 3) on Pendulum, where it learns more reliably (both measured). The MoP cores
run without expert dropout (``--dropout_beta 0``): with it, collection and the loss's replay
draw their own masks, so ``π_new/π_old`` is not 1 even before an update; on 3 seeds the best
rolling mean return was 361 / 370 / 273 with it and 389 / 430 / 412 without. The heads read
MoP's features scaled by ``--feature_scale`` (1/8 by default, :class:`FeatureScale`): they are
layer-normed, about 10x a GRU's hidden state.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from tensordict import TensorDictBase
from tensordict.nn import (
    NormalParamExtractor,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torch.distributions import Categorical, Independent, Normal
from torchrl.collectors import Collector
from torchrl.data import Categorical as CategoricalSpec
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer, TransformedEnv
from torchrl.modules import (
    ProbabilisticActor,
    TanhNormal,
    set_recurrent_mode,
)
from torchrl.modules.utils import get_primers_from_module
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from mop_torchrl import MoPModule, routing_cost_loss
from mop_torchrl.core.config import DEFAULT_RL_ALPHA, PRESETS

from masked_control import (  # beside this script
    TASKS,
    configure_torch,
    finished_episodes,
    greedy_returns,
    make_core,
    make_env,
    reached_return,
)

# Per-task defaults of the flags below (None there); a flag given on the command line wins.
# Both are the RL Zoo's recurrent PPO (hyperparams/ppo_lstm.yml), with one change. CartPoleNoVel: 8
# envs x 32 steps in one minibatch of 256, lambda 0.8, 20 epochs, lr 1e-3 and clip 0.2 both linearly
# to 0 (over --frames), and gamma 0.99 where the Zoo has 0.98: with 0.98 the GRU and the LSTM fell
# on 3 runs of 20 into policies whose episodes end near step 200 (0.98^100 = 0.13: a failure that
# far ahead barely moves the values), and each missed the rolling 475 on 2 seeds of 10; with 0.99
# both reached it on all of seeds 0-9, by 114k frames (the GRU on 7 of seeds 10-19). PendulumNoVel: 4
# envs x 1024 steps, 10 epochs of minibatches of 128 steps (sb3-contrib's default batch_size: here
# 32 chunks of 128 steps, one per minibatch), gamma 0.9, lambda 0.95, lr 1e-3 and clip 0.2 constant,
# gSDE redrawn every 4 steps. Both normalise observations and rewards (``--return_norm``). Chosen by
# measurement here (docs/classic_pomdp.md): a MoP actor's routing cost α is 3e-2 on CartPole and the
# package's ``DEFAULT_RL_ALPHA`` on Pendulum; its core is one block on CartPole (``0,32,64``: about
# the GRU's CPU per frame, where the paper preset's three blocks cost ~1.5x; at gamma 0.98 as fast
# to 475 as the paper preset) and the paper preset on Pendulum (over 10 seeds one block reached -250
# on 9 in 1.15x the GRU's median frames, the paper preset on all 10 in 0.98x). A MoP actor's
# critic: ``MOP_CRITIC``.
DEFAULTS = {
    "pendulum": {
        "frames": 151_552,
        "num_envs": 4,
        "steps_per_batch": 1024,
        "epochs": 10,
        "minibatches": 32,
        "chunk_steps": 128,
        "lr": 1e-3,
        "anneal_lr": False,
        "anneal_clip": False,
        "gsde_freq": 4,
        "gamma": 0.9,
        "lmbda": 0.95,
        "alpha": DEFAULT_RL_ALPHA,
        "mop_layers": PRESETS["paper"]["layers"],
    },
    "cartpole": {
        "frames": 122_880,
        "num_envs": 8,
        "steps_per_batch": 32,
        "epochs": 20,
        "minibatches": 1,
        "lr": 1e-3,
        "anneal_lr": True,
        "anneal_clip": True,
        "gsde_freq": 0,
        "gamma": 0.99,
        "lmbda": 0.8,
        "alpha": 3e-2,
        "mop_layers": "0,32,64",
    },
}

# A MoP actor's critic, per task. CartPole: a GRU, as the GRU baseline's own. At gamma 0.99 a MoP
# policy with it reached a rolling 475 on 8 of seeds 0-9 in a median 1.04x the GRU's frames,
# where the Zoo's LSTM critic gave 7 of 10 at 1.27x; over seeds 0-19, 17 of 20 as the GRU, at
# 1.15x its median (a MoP value function learns CartPole slowly: 0 of 3 seeds with MoP in both
# roles). Pendulum: the Zoo's LSTM (``enable_critic_lstm``), -250 in the MoP critic's frames
# (mean of 5 seeds) for less CPU, where a GRU critic took 1.17x the GRU's frames. A GRU or LSTM
# actor keeps a critic of its own kind (an LSTM critic slowed the GRU on Pendulum, 1.16x its
# frames, and left it level on CartPole).
MOP_CRITIC = {"cartpole": "gru", "pendulum": "lstm"}


class FeatureScale(nn.Module):
    """Multiplies a core's features by a constant before the heads read them.

    MoP's features are a LayerNorm's output (RMS 1 per unit: a norm of 8 at D=64) where a GRU's
    hidden state has a norm of about 0.8; the heads were tuned for the latter (the Zoo's LSTM).
    gSDE's noise grows with the latent's norm (median initial action std 3.46 for MoP against
    0.64 for the GRU at the Zoo's ``log_std_init``; 0.50 scaled), and every Adam step moves a
    head's output in proportion to its input. ``1/sqrt(D)`` gives MoP's features unit norm:
    masked Pendulum then reaches −250 in 0.96x the GRU's frames (mean of 3 seeds; 1.28x
    unscaled)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class StateDependentNoise(nn.Module):
    """gSDE (Raffin et al., 2022; SB3's ``use_sde``), the Zoo's exploration on Pendulum: from the
    actor's latent features ``z``, the mean action, the std ``sqrt(z² · σ² + 1e-6)`` and the
    noise ``z · (σ ⊙ ε)``, where ``ε`` is a ``[latent, action]`` matrix per env, drawn from
    N(0, 1) at every ``sample_freq``-th step of an episode and carried between steps like a
    recurrent state (key ``gsde_eps``, declared by :meth:`make_tensordict_primer`). The noise
    is smooth in time and scales with the state; ``z`` is detached from the std and the noise,
    as in SB3 (``learn_features=False``); ``σ = exp(log_std)``, ``log_std`` starting at
    ``log_std_init`` (SB3's, 0 by default). The noise scales with ``|z|``, so a core whose
    features are larger (MoP's are layer-normed: norm ~8 against a GRU's ~0.8) starts out
    exploring more for the same ``log_std_init``, unless the heads scale them
    (:class:`FeatureScale`)."""

    def __init__(
        self, latent_dim: int, action_dim: int, sample_freq: int, log_std_init: float = 0.0
    ) -> None:
        super().__init__()
        self.mean = nn.Linear(latent_dim, action_dim)
        self.log_std = nn.Parameter(torch.full((latent_dim, action_dim), log_std_init))
        self.sample_freq = sample_freq

    def forward(
        self, latent: torch.Tensor, eps: torch.Tensor, step_count: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        std, z = self.log_std.exp(), latent.detach()
        redraw = (step_count % self.sample_freq == 0).unsqueeze(-1)  # [..., 1, 1]
        eps = torch.where(redraw, torch.randn_like(eps), eps)
        noise = (z.unsqueeze(-2) @ (std * eps)).squeeze(-2)
        scale = (z.pow(2) @ std.pow(2) + 1e-6).sqrt()
        return self.mean(latent), scale, noise, eps

    def make_tensordict_primer(self) -> TensorDictPrimer:
        return TensorDictPrimer(
            Composite(gsde_eps=Unbounded(shape=tuple(self.log_std.shape))), expand_specs=True
        )


class GSDENormal(Independent):
    """A diagonal Normal (the log-probabilities PPO needs) whose samples are the gSDE action
    ``loc + noise``; its deterministic sample is ``loc``."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> None:
        super().__init__(Normal(loc, scale), 1)
        self.noise = noise

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        return (self.base_dist.loc + self.noise).expand(*sample_shape, *self.noise.shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.base_dist.loc


def make_actor_critic(
    core_kind: str,
    env: TransformedEnv,
    hidden: int,
    dropout_beta: float | None = None,
    mop_layers: str | None = None,
    gsde_freq: int = 0,
    log_std_init: float = 0.0,
    feature_scale: float = 64**-0.5,
    critic_kind: str | None = None,
) -> tuple[ProbabilisticActor, TensorDictSequential, list[nn.Module]]:
    """The Zoo's recurrent policy: ``observation → core → Linear(64)+ReLU → head`` for the
    actor (``TanhNormal`` for continuous actions, or with ``gsde_freq`` a Normal with gSDE
    exploration, :class:`StateDependentNoise`; categorical logits for discrete ones) and a
    separate ``observation → core → Linear(64)+ReLU → value`` critic with its own core, of
    ``critic_kind`` (default: ``core_kind``). The heads of MoP cores first multiply the
    features by ``feature_scale`` (:class:`FeatureScale`; nothing is inserted at 1)."""
    obs_dim = env.observation_spec["observation"].shape[-1]
    critic_kind = critic_kind or core_kind
    actor_core = make_core(core_kind, obs_dim, hidden, "actor", dropout_beta, mop_layers)
    critic_core = make_core(critic_kind, obs_dim, hidden, "critic", dropout_beta, mop_layers)

    def latent(kind: str) -> list[nn.Module]:
        if kind != "mop":
            return [nn.Linear(hidden, 64), nn.ReLU()]
        scale = [FeatureScale(feature_scale)] if feature_scale != 1 else []
        return [*scale, nn.Linear(64, 64), nn.ReLU()]

    def mlp(kind: str, out: int) -> nn.Module:
        return nn.Sequential(*latent(kind), nn.Linear(64, out))

    action_spec = env.action_spec_unbatched
    if isinstance(action_spec, CategoricalSpec):
        policy_head = TensorDictModule(
            mlp(core_kind, action_spec.n), ["actor_features"], ["logits"]
        )
        dist_keys, dist_class, dist_kwargs = ["logits"], Categorical, {}
    elif gsde_freq:
        noise = StateDependentNoise(64, action_spec.shape[-1], gsde_freq, log_std_init)
        policy_head = TensorDictSequential(
            TensorDictModule(
                nn.Sequential(*latent(core_kind)), ["actor_features"], ["actor_latent"]
            ),
            TensorDictModule(
                noise,
                ["actor_latent", "gsde_eps", "step_count"],
                ["loc", "scale", "gsde_noise", ("next", "gsde_eps")],
            ),
        )
        dist_keys = {"loc": "loc", "scale": "scale", "noise": "gsde_noise"}
        dist_class, dist_kwargs = GSDENormal, {}
    else:
        policy_head = TensorDictModule(
            nn.Sequential(mlp(core_kind, 2 * action_spec.shape[-1]), NormalParamExtractor()),
            ["actor_features"],
            ["loc", "scale"],
        )
        dist_keys, dist_class = ["loc", "scale"], TanhNormal
        dist_kwargs = {"low": action_spec.space.low, "high": action_spec.space.high}
    actor = ProbabilisticActor(
        TensorDictSequential(actor_core, policy_head),
        in_keys=dist_keys,
        spec=action_spec,
        distribution_class=dist_class,
        distribution_kwargs=dist_kwargs,
        return_log_prob=True,
    )
    critic = TensorDictSequential(
        critic_core, TensorDictModule(mlp(critic_kind, 1), ["critic_features"], ["state_value"])
    )
    return actor, critic, [actor_core, critic_core]


def make_agent(
    args: argparse.Namespace, env: TransformedEnv
) -> tuple[ProbabilisticActor, TensorDictSequential, list[nn.Module]]:
    """The actor, critic and cores the flags ask for, with every state they carry between
    steps (the cores', gSDE's noise) declared to ``env`` by the primers found in them."""
    actor, critic, cores = make_actor_critic(
        args.core,
        env,
        args.hidden,
        args.dropout_beta,
        args.mop_layers,
        args.gsde_freq,
        args.log_std_init,
        args.feature_scale,
        args.critic_core,
    )
    env.append_transform(get_primers_from_module(TensorDictSequential(actor, critic)))
    return actor, critic, cores


def make_recipe_env(args: argparse.Namespace) -> TransformedEnv:
    """The task's envs, rewards scaled by ``--reward_scale`` or, with ``--return_norm``, by a
    running std of the return discounted with the recipe's ``--gamma`` (the Zoo's way)."""
    if args.return_norm:
        return make_env(args.env, args.num_envs, args.seed, None, return_gamma=args.gamma)
    return make_env(args.env, args.num_envs, args.seed, args.reward_scale)


def make_advantage(critic: TensorDictSequential, gamma: float, lmbda: float) -> GAE:
    """GAE over whole sequences; ``deactivate_vmap=True`` for recurrent critics (see above)."""
    return GAE(gamma=gamma, lmbda=lmbda, value_network=critic, deactivate_vmap=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--core", choices=["mop", "gru", "lstm"], default="mop")
    parser.add_argument(
        "--critic_core",
        choices=["mop", "gru", "lstm"],
        help="the critic's own core (default: the actor's kind; for a MoP actor, MOP_CRITIC)",
    )
    parser.add_argument("--env", choices=list(TASKS), default="pendulum")
    # None: the task's value in DEFAULTS
    parser.add_argument("--frames", type=int, help="env steps in total")
    parser.add_argument("--num_envs", type=int)
    parser.add_argument("--steps_per_batch", type=int, help="steps per env per batch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--minibatches", type=int, help="groups of sequences per epoch")
    parser.add_argument(
        "--chunk_steps",
        type=int,
        help="cut each env's sequence into chunks of this many steps, each replayed from its "
        "stored state (sb3-contrib's RecurrentPPO minibatches); default: whole sequences",
    )
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--anneal_lr", action=argparse.BooleanOptionalAction, default=None, help="linearly to 0"
    )
    parser.add_argument(
        "--anneal_clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip range linearly to 0",
    )
    parser.add_argument(
        "--normalize_advantage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="divide each minibatch's advantages by their std (SB3's default)",
    )
    parser.add_argument(
        "--return_norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="divide rewards by a running std of the discounted return (the Zoo's "
        "VecNormalize); --no-return_norm multiplies them by --reward_scale instead",
    )
    parser.add_argument(
        "--reward_scale", type=float, default=0.1, help="with --no-return_norm: reward multiplier"
    )
    parser.add_argument("--hidden", type=int, default=64, help="GRU/LSTM hidden size")
    parser.add_argument(
        "--dropout_beta",
        type=float,
        default=0.0,
        help="MoP expert dropout (the preset's is 0.8; off by default: PPO's importance ratios "
        "compare the policy at collection and in the loss, each drawing its own masks)",
    )
    parser.add_argument(
        "--mop_layers",
        help='MoP expert sizes per block (default: one block "0,32,64" on cartpole, the paper '
        'preset\'s "0,16,32" x 3 on pendulum)',
    )
    parser.add_argument(
        "--gsde_freq",
        type=int,
        help="continuous actions: gSDE exploration, its noise redrawn every this many steps; "
        "0: a TanhNormal",
    )
    parser.add_argument(
        "--log_std_init",
        type=float,
        default=0.0,
        help="gSDE: the noise's initial log std per latent unit (SB3's log_std_init)",
    )
    parser.add_argument(
        "--feature_scale",
        type=float,
        default=64**-0.5,
        help="multiply a MoP core's (layer-normed) features by this before its head (default "
        "1/sqrt(64): unit norm); GRU and LSTM features are read as they are",
    )
    parser.add_argument("--gamma", type=float)
    parser.add_argument("--lmbda", type=float)
    parser.add_argument(
        "--alpha",
        type=float,
        help="routing cost weight (plain form); default 3e-2 on cartpole, DEFAULT_RL_ALPHA on "
        "pendulum",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_wall_s", type=float, default=None, help="stop early (results kept) after this"
    )
    parser.add_argument(
        "--stop_return",
        type=float,
        default=None,
        help="stop after the batch in which the mean return of --stop_window consecutive "
        "episodes first reaches this",
    )
    parser.add_argument("--stop_window", type=int, default=100)
    parser.add_argument("--out", help="write the learning curve and routing here (JSON)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.env].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.critic_core is None:
        args.critic_core = MOP_CRITIC[args.env] if args.core == "mop" else args.core
    if not 0 < args.feature_scale < float("inf"):
        parser.error(f"--feature_scale must be positive and finite, got {args.feature_scale}")
    if args.gsde_freq < 0:
        parser.error(f"--gsde_freq must be >= 0 (0: no gSDE), got {args.gsde_freq}")
    if args.gsde_freq and args.env == "cartpole":
        parser.error(
            "--gsde_freq is for continuous actions (--env pendulum); CartPole's are discrete"
        )
    if args.chunk_steps is not None and (
        args.chunk_steps < 1 or args.steps_per_batch % args.chunk_steps
    ):
        parser.error(
            f"--chunk_steps {args.chunk_steps} must divide --steps_per_batch {args.steps_per_batch}"
        )
    return args


class Learner(NamedTuple):
    """What a PPO update needs: the loss, GAE, the optimiser, and the routing costs that the MoP
    cores' forward hooks capture from the loss's own (differentiable) replay."""

    loss_fn: ClipPPOLoss
    advantage: GAE
    optimizer: torch.optim.Optimizer
    costs: list[torch.Tensor]


def make_learner(
    actor: ProbabilisticActor,
    critic: TensorDictSequential,
    cores: list[nn.Module],
    args: argparse.Namespace,
) -> Learner:
    """The Zoo's (SB3's) PPO: value loss 0.5 * MSE, Adam eps 1e-5 (gradient norm 0.5 in
    :func:`ppo_update`); with MoP cores, their replay's routing costs are collected."""
    loss_fn = ClipPPOLoss(
        actor,
        critic,
        clip_epsilon=0.2,
        entropy_coeff=0.0,
        critic_coeff=0.5,
        loss_critic_type="l2",
        normalize_advantage=args.normalize_advantage,
        functional=False,
    )
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=args.lr, eps=1e-5, fused=True)
    learner = Learner(loss_fn, make_advantage(critic, args.gamma, args.lmbda), optimizer, [])
    for core in cores:
        if isinstance(core, MoPModule):
            core.register_forward_hook(
                lambda m, _i, out: (
                    learner.costs.append(out[m.cost_key]) if out[m.cost_key].requires_grad else None
                )
            )
    return learner


def make_collector(
    env: TransformedEnv,
    actor: ProbabilisticActor,
    critic: TensorDictSequential,
    args: argparse.Namespace,
) -> Collector:
    """Batches of ``--num_envs`` x ``--steps_per_batch`` frames. The collector runs the critic
    too, so that its core's state is carried step by step and stored with the data (else the
    loss would replay the critic from zeros at every batch)."""
    return Collector(
        env,
        TensorDictSequential(actor, critic),
        frames_per_batch=args.num_envs * args.steps_per_batch,
        total_frames=args.frames,
    )


def ppo_update(
    batch: TensorDictBase, learner: Learner, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """GAE over the collected ``[env, time]`` batch, then ``--epochs`` passes over
    ``--minibatches`` groups of sequences (whole per-env sequences, or ``--chunk_steps``-step
    chunks of them); returns each step's loss and ``kl_approx`` (the mean of ``log π_old -
    log π``, ClipPPOLoss's diagnostic of how far the policy has moved from the collection's)."""
    del batch["state_value"]  # the collection's value; GAE recomputes it for both steps
    with torch.no_grad(), set_recurrent_mode(True):
        learner.advantage(batch)
    if args.chunk_steps is not None:
        # [env, time] -> [env * chunks, chunk_steps]: each chunk starts from the cores' states
        # stored at its first step (recurrent mode reads them there), as sb3-contrib's do.
        envs, steps = batch.shape
        batch = batch.reshape(envs * (steps // args.chunk_steps), args.chunk_steps)
    losses, kls = [], []
    for _ in range(args.epochs):
        for rows in torch.randperm(batch.shape[0]).chunk(args.minibatches):
            learner.costs.clear()
            out = learner.loss_fn(batch[rows])
            loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
            if learner.costs:
                cost = torch.cat([c.flatten() for c in learner.costs])
                loss = routing_cost_loss(loss, cost, args.alpha, mode="plain")
            learner.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(learner.loss_fn.parameters(), 0.5)
            learner.optimizer.step()
            losses.append(loss.item())
            kls.append(out["kl_approx"].item())
    return losses, kls


def main(argv: Sequence[str] | None = None) -> dict:
    """Trains and returns the curve (per finished episode: frames so far, return), the losses
    and ``kl_approx`` per gradient step, the MoP routing of the last batches and the last
    collected batch."""
    args = parse_args(argv)
    configure_torch(args.seed)
    env = make_recipe_env(args)
    actor, critic, cores = make_agent(args, env)
    learner = make_learner(actor, critic, cores, args)
    collector = make_collector(env, actor, critic, args)
    frames_per_batch = args.num_envs * args.steps_per_batch

    curve, losses, kls, routing = [], [], [], []
    frames, start, reached = 0, time.perf_counter(), False
    for batch in collector:  # [env, time]
        if args.max_wall_s is not None and time.perf_counter() - start > args.max_wall_s:
            break
        frames += batch.numel()
        curve += finished_episodes(batch, frames)
        if args.core == "mop":
            keys = cores[0].routing_keys
            routing.append([batch[key].mean((0, 1)) for key in keys])
        # Linear schedules to 0 over --frames, from the frames seen before this batch.
        remaining = 1 - (frames - frames_per_batch) / args.frames
        if args.anneal_lr:
            for group in learner.optimizer.param_groups:
                group["lr"] = args.lr * remaining
        if args.anneal_clip:
            learner.loss_fn.clip_epsilon.fill_(0.2 * remaining)
        step_losses, step_kls = ppo_update(batch, learner, args)
        losses += step_losses
        kls += step_kls
        recent = [r for _, r in curve[-20:]]
        reached = reached_return(curve, args.stop_return, args.stop_window)
        print(
            f"frames {frames:>7}  loss {losses[-1]:.4f}  "
            f"return(last 20) {sum(recent) / max(len(recent), 1):7.1f}  "
            f"{time.perf_counter() - start:5.0f} s",
            flush=True,
        )
        if reached:
            break
    # The Zoo's figure: the final policy, deterministic (greedy / the mean action), one whole
    # episode per env from a reset (each ends within the task's episode length).
    final_eval = greedy_returns(env, actor, args.env)
    print(f"deterministic final policy: {final_eval.mean().item():.1f} ({args.num_envs} episodes)")
    result = {
        "task": f"masked {TASKS[args.env][0]}",
        "algo": "recurrent PPO",
        "core": args.core,
        "critic_core": args.critic_core,
        "alpha": args.alpha,
        "mop_layers": args.mop_layers if "mop" in (args.core, args.critic_core) else None,
        "feature_scale": args.feature_scale,
        "seed": args.seed,
        "frames": frames,
        "stopped_early": frames < args.frames,
        "reached_stop_return": reached,
        "wall_s": time.perf_counter() - start,
        "params": sum(p.numel() for core in cores for p in core.parameters()),
        "curve": curve,
        "final_eval": final_eval.tolist(),
        "losses": losses,
        "kl_approx": kls,
        "routing": [torch.stack(block).mean(0).tolist() for block in zip(*routing[-5:])],
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    collector.shutdown()
    return {**result, "last_batch": batch}


if __name__ == "__main__":
    main()
