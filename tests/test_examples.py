"""Each example script runs end to end for a few updates."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import GRUModule, LSTMModule, set_recurrent_mode

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args",
    [
        ("collector_replay.py", ["--frames", "256"]),
        ("imitation.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
        ("ppo.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
    ],
)
@pytest.mark.subprocess
@pytest.mark.slow
def test_example_runs(script, args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def load_example(name: str):
    """Imports ``examples/{name}.py`` as a module (its ``main(argv)`` returns the results),
    with the examples' folder importable as when the script runs (``masked_control``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PPO_SMOKE = [
    *("--frames", "128", "--num_envs", "4", "--steps_per_batch", "16"),
    *("--epochs", "1", "--minibatches", "2"),
]
SMOKE = {
    # Pendulum's defaults replay 8-step chunks with gSDE; CartPole's, whole sequences
    "recurrent_ppo": [*PPO_SMOKE, "--chunk_steps", "8"],
    "recurrent_ppo_cartpole": [*PPO_SMOKE, "--env", "cartpole"],
}
SMOKE["recurrent_dqn"] = [
    *("--frames", "512", "--num_envs", "4", "--seq_len", "32", "--burn_in", "8"),
    *("--warmup", "128", "--batch_rows", "4", "--updates_per_batch", "2"),
]
# each recipe's cores and the prefixes of their state keys (an LSTM's are "{prefix}_h"/"_c")
STATE_KEYS = {"recurrent_ppo": ("actor_state", "critic_state"), "recurrent_dqn": ("q_state",)}


@pytest.mark.parametrize("core", ["mop", "gru"])
@pytest.mark.parametrize("example", list(SMOKE))
@pytest.mark.slow
def test_recurrent_recipe_smoke(example, core, tmp_path):
    out = tmp_path / "result.json"
    script = example.removesuffix("_cartpole")
    result = load_example(script).main([*SMOKE[example], "--core", core, "--out", str(out)])
    assert result["losses"] and all(math.isfinite(x) for x in result["losses"])
    assert json.loads(out.read_text())["curve"] == [list(c) for c in result["curve"]]
    if script == "recurrent_ppo":
        # The loss's recurrent replay gives the collection's log-probabilities: at each batch's
        # first gradient step (of 1 epoch x 2 minibatches) the policy has not moved, so
        # ``kl_approx`` is 0 up to float error.
        kls = result["kl_approx"]
        assert len(kls) == len(result["losses"])
        assert max(abs(k) for k in kls[::2]) < 1e-4, kls
    # the hidden state propagates: the state stored at t+1 is the ("next", state) written at t
    # (within an episode), zero at episode starts, and not zero everywhere (recurrence alive)
    batch = result["last_batch"]  # [env, time]
    is_init = batch["is_init"].squeeze(-1)
    # each core (PPO: the actor's and the critic's) keeps its state under its own keys
    names = [k for k in batch.keys() if k.startswith(STATE_KEYS[script])]  # noqa: SIM118
    for prefix in STATE_KEYS[script]:  # (iterating a TensorDict runs over its batch dim)
        assert any(k.startswith(prefix) for k in names), f"{prefix} not collected"
    state = batch.select(*names)
    keys = list(state.keys(include_nested=True, leaves_only=True))
    carried = ~is_init[:, 1:]
    assert carried.any()
    for key in keys:
        stored, written = batch[key], batch["next", key]
        assert (stored[is_init] == 0).all()
        torch.testing.assert_close(stored[:, 1:][carried], written[:, :-1][carried])
        assert written.abs().sum() > 0, f"{key} stays zero: recurrence is dead"
    if core == "mop":  # routing per block: one weight per expert ("0,16,32"), summing to 1
        blocks = 1 if example == "recurrent_ppo_cartpole" else 3  # the recipes' default layers
        assert [len(w) for w in result["routing"]] == [3] * blocks
        assert all(abs(sum(w) - 1) < 1e-5 for w in result["routing"])


@pytest.mark.slow
def test_ppo_recipe_is_reproducible_given_its_seed():
    """Two runs with one seed: the same losses, episodes and final greedy returns (the final
    evaluation seeds its env: where collection leaves the env's generators is not fixed)."""
    ppo = load_example("recurrent_ppo")
    argv = [*SMOKE["recurrent_ppo_cartpole"], "--core", "mop", "--seed", "3"]
    first, second = ppo.main(argv), ppo.main(argv)
    for key in ("losses", "curve", "final_eval"):
        assert first[key] == second[key], key


def test_runs_stop_where_the_rolling_mean_first_reaches_the_target():
    """``--stop_return``: a run stops after the batch in which the mean of ``--stop_window``
    consecutive episodes first reaches the target (the benchmark's frames to target), even if
    the last ones have fallen below it by the batch's end; a shorter partial mean never counts."""
    masked_control = load_example("masked_control")
    curve = [(100 * (i + 1), r) for i, r in enumerate([0.0, 0.0, 10.0, 10.0, 10.0, 0.0, 4.0])]
    assert masked_control.frames_to_return(curve, 10.0, 3) == 500.0
    assert masked_control.reached_return(curve, 10.0, 3)  # the last 3 average 4.7
    assert masked_control.reached_return(curve[:5], 10.0, 3)
    assert not masked_control.reached_return(curve[:4], 10.0, 3)
    assert not masked_control.reached_return(curve, 10.5, 3)
    assert not masked_control.reached_return(curve, None, 3)
    assert not masked_control.reached_return([(100, 50.0)], 10.0, 3)  # 1 episode of 3
    assert masked_control.frames_to_return([(100, 50.0)], 10.0, 3) is None


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_baseline_cores_run_on_their_own_entries(kind):
    """A GRU/LSTM core (``OwnEntries`` around TorchRL's module) given a TensorDict with other
    entries (another core's nested states, an action) writes what the bare module writes, in
    step and in recurrent mode, leaves the other entries alone, and has one primer."""
    from tensordict import TensorDict
    from torchrl.modules.utils import get_primers_from_module

    torch.manual_seed(0)
    core = load_example("masked_control").make_core(kind, 2, 8, "critic")
    bare = core.module
    primer = get_primers_from_module(core)
    assert set(primer.primers.keys()) == {k for k in bare.in_keys if k.startswith("critic_state")}
    td = TensorDict(
        {
            "observation": torch.randn(3, 5, 2),
            "is_init": torch.rand(3, 5, 1) < 0.3,
            "action": torch.randn(3, 5, 1),
            ("actor_state", "block0", "router"): torch.randn(3, 5, 1, 4),
        },
        [3, 5],
    )
    for key, spec in primer.primers.items(True, True):
        td.set(key, torch.randn(3, 5, *spec.shape))
    with torch.no_grad():
        for recurrent, data in ((True, td), (False, td[:, 0])):
            with set_recurrent_mode(recurrent):
                wrapped, expected = core(data.clone()), bare(data.clone())
            for key in core.out_keys:
                assert torch.equal(wrapped[key], expected[key]), key
            assert torch.equal(wrapped["action"], data["action"])
            assert torch.equal(
                wrapped["actor_state", "block0", "router"], data["actor_state", "block0", "router"]
            )


def test_mop_layers_flag_sets_every_recipe_core():
    """``--mop_layers`` reaches each MoP core of both recipes (the actor's and the critic's in
    PPO); without it the cores keep their recipe's default, the paper preset's three blocks
    (PPO on Pendulum, the DQN; PPO's one-block CartPole default is tested with its others)."""
    ppo, dqn = load_example("recurrent_ppo"), load_example("recurrent_dqn")
    env = load_example("masked_control").make_env("cartpole", 2, 0, 0.1)
    for layers, expected in ((None, [[0, 16, 32]] * 3), ("0,32,64", [[0, 32, 64]])):
        flags = [] if layers is None else ["--mop_layers", layers]
        args = ppo.parse_args(["--core", "mop", "--env", "pendulum", *flags])
        _, _, cores = ppo.make_actor_critic("mop", env, 64, 0.0, args.mop_layers)
        args = dqn.parse_args(["--core", "mop", *flags])
        cores.append(dqn.make_qnet("mop", 2, 2, 64, None, args.mop_layers)[0])
        assert [core.config.layers for core in cores] == [expected] * 3


def test_return_scaling_divides_rewards_by_the_returns_running_std():
    """``ReturnScaling`` against SB3's ``VecNormalize`` written out in closed form: each reward
    divided by the std of every discounted return seen so far (a prior of count 1e-4, mean 0,
    variance 1), clipped to ±10; each env's return restarts after its episode ends, also when
    the other envs go on (partial resets)."""
    masked_control = load_example("masked_control")
    gamma, always_left = 0.98, lambda td: td.set("action", torch.zeros(td.shape, dtype=torch.long))
    env = masked_control.make_env("cartpole", 3, 0, None, return_gamma=gamma)
    rollout = env.rollout(60, always_left, break_when_any_done=False)
    scaled, done = rollout["next", "reward"].squeeze(-1).double(), rollout["next", "done"]
    ends = done.squeeze(-1)
    assert (ends.any(0) & ~ends.all(0)).any()  # some env's episode ends while others go on

    returns, seen, expected = torch.zeros(3, dtype=torch.float64), [], []
    for t in range(scaled.shape[1]):
        returns = returns * gamma + 1.0  # CartPole's reward
        seen.append(returns)
        values, prior = torch.cat(seen), 1e-4
        mean = values.sum() / (prior + len(values))
        var = (prior + ((values - mean) ** 2).sum() + prior * mean**2) / (prior + len(values))
        expected.append((1.0 / (var + 1e-8).sqrt()).clamp(max=10.0).expand(3))
        returns = returns.masked_fill(done[:, t, 0], 0.0)
    torch.testing.assert_close(scaled, torch.stack(expected, 1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="one of reward_scale and return_gamma"):
        masked_control.make_env("cartpole", 2, 0, 0.1, return_gamma=gamma)
    # Both PPO recipes normalise this way by default, each with its own gamma.
    ppo = load_example("recurrent_ppo")
    for task, task_gamma in (("cartpole", 0.99), ("pendulum", 0.9)):
        scaling = ppo.make_recipe_env(ppo.parse_args(["--env", task])).transform[-1]
        assert type(scaling).__name__ == "ReturnScaling" and scaling.gamma == task_gamma


def test_ppo_defaults_pick_the_critic_alpha_and_layers():
    """The measured defaults: a MoP actor's critic is a GRU on CartPole and the Zoo's LSTM on
    Pendulum, a GRU or LSTM actor's is of its own kind; α is 3e-2 on CartPole and
    ``DEFAULT_RL_ALPHA`` on Pendulum; the MoP core is one block on CartPole and the paper preset
    on Pendulum; advantages are normalised (SB3's default); flags win, down to the loss."""
    from mop_torchrl.core.config import DEFAULT_RL_ALPHA

    ppo = load_example("recurrent_ppo")
    for task, alpha, mop_critic in (
        ("cartpole", 3e-2, "gru"),
        ("pendulum", DEFAULT_RL_ALPHA, "lstm"),
    ):
        for core, critic in (("mop", mop_critic), ("gru", "gru"), ("lstm", "lstm")):
            args = ppo.parse_args(["--env", task, "--core", core])
            assert (args.critic_core, args.alpha) == (critic, alpha)
            assert args.normalize_advantage is True
    env = load_example("masked_control").make_env("cartpole", 2, 0, 0.1)
    args = ppo.parse_args(["--env", "cartpole", "--core", "mop"])
    actor, critic, cores = ppo.make_agent(args, env)
    assert any(isinstance(m, GRUModule) for m in critic.modules())
    assert len(cores[0].core.blocks) == 1
    assert ppo.make_learner(actor, critic, cores, args).loss_fn.normalize_advantage
    args.normalize_advantage = ppo.parse_args(["--no-normalize_advantage"]).normalize_advantage
    assert not ppo.make_learner(actor, critic, cores, args).loss_fn.normalize_advantage
    args = ppo.parse_args(["--env", "pendulum", "--core", "mop"])
    assert args.mop_layers == "0,16,32;0,16,32;0,16,32"
    _, critic, _ = ppo.make_agent(
        args, load_example("masked_control").make_env("pendulum", 2, 0, 0.1)
    )
    assert any(isinstance(m, LSTMModule) for m in critic.modules())
    args = ppo.parse_args(
        ["--env", "cartpole", "--critic_core", "mop", "--alpha", "0", "--mop_layers", "0,16"]
    )
    assert (args.critic_core, args.alpha, args.mop_layers) == ("mop", 0.0, "0,16")


def test_dqn_n_step_targets_cut_at_episode_ends():
    """n-step double-DQN targets by hand: a terminal step ends the sum without bootstrap, a sum
    that meets a time-limit truncation is invalid (its next state is not in the row)."""
    from tensordict import TensorDict

    n_step_targets = load_example("recurrent_dqn").n_step_targets
    reward = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    terminated = torch.tensor([[False, False, True, False, False, False, False]])
    truncated = torch.tensor([[False, False, False, False, False, True, False]])
    rows = TensorDict(
        {
            "next": {
                "reward": reward[..., None],
                "terminated": terminated[..., None],
                "done": (terminated | truncated)[..., None],
            }
        },
        [1, 7],
    )
    q_next = torch.arange(10.0, 17.0)[None]  # target value of the greedy action at each step
    g = 0.5
    target, valid = n_step_targets(rows, q_next, gamma=g, n=2)
    expected = [
        1 + g * 2 + g**2 * q_next[0, 2],  # t=0: two rewards, bootstrap at t=2
        2 + g * 3,  # t=1: step 2 is terminal, no bootstrap
        3.0,  # t=2: terminal at once
        4 + g * 5 + g**2 * q_next[0, 5],  # t=3
        5 + g * 6,  # t=4: meets the truncation at 5 (invalid)
    ]
    torch.testing.assert_close(target[0], torch.tensor(expected))
    assert valid[0].tolist() == [True, True, True, True, False]


@pytest.mark.slow
def test_ppo_ratio_is_one_before_an_update_without_expert_dropout():
    """PPO's first epoch must see ``π_new/π_old = 1``: the recipe's default MoP cores (no expert
    dropout) replay the collected log-probs exactly in training mode; with the preset's
    dropout the two draws differ once routing is peaked (experts below γ = 0.1 may drop)."""
    ppo = load_example("recurrent_ppo")
    default = ppo.parse_args(["--core", "mop", "--env", "cartpole"]).dropout_beta
    log_probs = {}
    for dropout_beta in (default, 0.8):
        torch.manual_seed(0)
        env = load_example("masked_control").make_env("cartpole", 2, 0, 0.1)
        actor, _, cores = ppo.make_actor_critic("mop", env, 64, dropout_beta)
        for core in cores:
            env.append_transform(core.make_tensordict_primer())
            for block in core.core.blocks:  # peaked routing, as after training (~0.86/0.07/0.07)
                block.router_head.bias.data = torch.tensor([2.5, 0.0, 0.0])
        data = env.rollout(16, actor, break_when_any_done=False)  # training mode, as collected
        with torch.no_grad(), set_recurrent_mode(True):
            replayed = actor.get_dist(data.clone()).log_prob(data["action"])
        log_probs[dropout_beta] = (data["action_log_prob"], replayed)
    torch.testing.assert_close(*log_probs[default])
    assert not torch.allclose(*log_probs[0.8])


@pytest.mark.parametrize("core", ["mop", "gru"])
def test_ppo_chunks_replay_from_their_stored_states(core):
    """``--chunk_steps``: cut into chunks, the collected sequences replay the collected
    log-probs, each chunk starting from the core's state stored at its first step (not from
    zeros); a chunk length that does not divide the batch's steps is refused."""
    ppo = load_example("recurrent_ppo")
    torch.manual_seed(0)
    env = load_example("masked_control").make_env("cartpole", 2, 0, 0.1)
    actor, _, _ = ppo.make_agent(ppo.parse_args(["--core", core, "--env", "cartpole"]), env)
    data = env.rollout(16, actor, break_when_any_done=False)  # [2 envs, 16 steps]
    chunks = data.reshape(8, 4)
    assert not chunks["is_init"][:, 0].all()  # some chunks start inside an episode
    with torch.no_grad(), set_recurrent_mode(True):
        replayed = actor.get_dist(chunks.clone()).log_prob(chunks["action"])
    torch.testing.assert_close(replayed, chunks["action_log_prob"])
    with pytest.raises(SystemExit):
        ppo.parse_args(["--env", "cartpole", "--chunk_steps", "5"])  # 32 steps per batch
    with pytest.raises(SystemExit):
        ppo.parse_args(["--env", "cartpole", "--gsde_freq", "4"])  # discrete actions


def test_mop_heads_read_features_at_a_grus_scale():
    """MoP's layer-normed features are ~10x a GRU's hidden state; by default the heads scale
    them by 1/8, so that gSDE starts with about the GRU's exploration noise (its std grows with
    the latent's norm), not 5x more (``--feature_scale 1``)."""
    ppo = load_example("recurrent_ppo")

    def initial_std(core: str, *flags: str) -> float:
        torch.manual_seed(0)
        env = load_example("masked_control").make_env("pendulum", 2, 0, 0.1)
        actor, _, _ = ppo.make_agent(ppo.parse_args(["--core", core, *flags]), env)
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            return env.rollout(16, actor, break_when_any_done=False)["scale"].median().item()

    assert ppo.parse_args(["--core", "mop"]).feature_scale == 0.125
    env = load_example("masked_control").make_env("cartpole", 2, 0, 0.1)
    for core, scaled in (("mop", True), ("gru", False)):  # GRU/LSTM features are read as is
        actor, critic, _ = ppo.make_actor_critic(core, env, 64, feature_scale=0.125)
        heads = [*actor.modules(), *critic.modules()]
        assert sum(isinstance(m, ppo.FeatureScale) for m in heads) == (2 if scaled else 0)
    with pytest.raises(SystemExit):
        ppo.parse_args(["--core", "mop", "--feature_scale", "0"])
    gru, mop = initial_std("gru"), initial_std("mop")
    assert 0.5 < mop / gru < 2, (mop, gru)
    assert initial_std("mop", "--feature_scale", "1") > 3 * gru


@pytest.mark.slow
def test_ppo_mop_policy_with_a_gru_critic():
    """``--critic_core gru``: a MoP actor beside a GRU critic, each carrying its own state
    (nested MoP keys, one GRU tensor), the routing cost taken from the MoP core only."""
    ppo = load_example("recurrent_ppo")
    argv = [*SMOKE["recurrent_ppo_cartpole"], "--core", "mop", "--critic_core", "gru"]
    result = ppo.main(argv)
    batch = result["last_batch"]
    assert batch["actor_state"].keys() and isinstance(batch["critic_state"], torch.Tensor)
    carried = ~batch["is_init"].squeeze(-1)[:, 1:]
    stored, written = batch["critic_state"], batch["next", "critic_state"]
    torch.testing.assert_close(stored[:, 1:][carried], written[:, :-1][carried])
    assert written.abs().sum() > 0
    assert all(math.isfinite(x) for x in result["losses"])
    assert [len(w) for w in result["routing"]] == [3]  # CartPole's one block, "0,32,64"


def test_gsde_actor_explores_smoothly_and_replays_its_log_probs():
    """``--gsde_freq 4``: the noise matrix is carried between steps and redrawn at every 4th
    step of an episode; the action is the mean plus that state-dependent noise, and PPO's
    replay of the collected data gives the collected log-probs (ratio 1 before an update)."""
    ppo = load_example("recurrent_ppo")
    torch.manual_seed(0)
    env = load_example("masked_control").make_env("pendulum", 2, 0, 0.1)
    actor, _, _ = ppo.make_agent(ppo.parse_args(["--core", "gru", "--gsde_freq", "4"]), env)
    with set_exploration_type(ExplorationType.RANDOM):  # as a collector samples
        data = env.rollout(12, actor, break_when_any_done=False)  # [2 envs, 12 steps]
    eps = data["next", "gsde_eps"]
    changed = (eps[:, 1:] != eps[:, :-1]).flatten(2).any(-1)  # [2, 11]: drawn at step t+1
    step = data["step_count"][:, 1:].squeeze(-1)
    assert (changed == (step % 4 == 0)).all()
    torch.testing.assert_close(data["action"], data["loc"] + data["gsde_noise"])
    assert data["gsde_noise"].abs().min() > 0
    with torch.no_grad(), set_recurrent_mode(True):
        replayed = actor.get_dist(data.clone()).log_prob(data["action"])
    torch.testing.assert_close(replayed, data["action_log_prob"])
