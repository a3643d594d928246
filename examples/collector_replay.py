"""Collect BabyAI frames with a MoP policy, store them, and replay them in recurrent mode.

    python examples/collector_replay.py --frames 512

Walks through the TorchRL contract: the collector registers the policy's primer, hidden states
flow through ("next", ...) keys, a replay buffer stores them with trajectory ids, and a sampled
[B, T] slice replayed in recurrent mode (as a loss would) reproduces the collection-time logits.
"""

import argparse
import tempfile

import torch
from tensordict.nn import InteractionType
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, SliceSampler, TensorDictReplayBuffer
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.policy import make_policy, policy_parts

parser = argparse.ArgumentParser()
parser.add_argument("--task_id", "--level", default="GoToLocal", help="BabyAI level")
parser.add_argument("--num_envs", type=int, default=4)
parser.add_argument("--frames", type=int, default=1024)
parser.add_argument("--slice_len", type=int, default=8)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

# 1. A MoP actor: encoder -> MoPModule -> logits -> categorical action.
actor, _ = make_policy("mop", mop=MoPConfig.from_preset("paper"))
actor.eval()
core = policy_parts(actor).core
print("hidden-state keys:", core.state_keys)

# 2. A collector over batched BabyAI envs; it adds the primer for the hidden states itself.
env = make_babyai_env(args.task_id, num_envs=args.num_envs, seed=args.seed, parallel=False)
collector = Collector(
    env,
    actor,
    frames_per_batch=args.frames,
    total_frames=args.frames,
    exploration_type=InteractionType.RANDOM,
    auto_register_policy_transforms=True,
)
data = next(iter(collector))
collector.shutdown()
print("collected", data.batch_size, "episodes started:", int(data["is_init"].sum()))

# 3. Store the frames; SliceSampler samples sequences within trajectories and marks each
#    slice start with is_init, where the core restarts from the stored hidden state.
with tempfile.TemporaryDirectory() as scratch:
    buffer = TensorDictReplayBuffer(
        storage=LazyMemmapStorage(args.frames, scratch_dir=scratch),
        sampler=SliceSampler(slice_len=args.slice_len, traj_key=("collector", "traj_ids")),
        batch_size=4 * args.slice_len,
    )
    buffer.extend(data.reshape(-1))
    sample = buffer.sample().reshape(4, args.slice_len)

# 4. Replay in recurrent mode (what TorchRL losses do) and compare with collection time.
with set_recurrent_mode(True), torch.no_grad():
    replayed = policy_parts(actor).logits(sample.exclude("logits").clone())
error = (replayed["logits"] - sample["logits"]).abs().max().item()
print(f"max |logits(replay) - logits(collection)| = {error:.2e}")
print("routing weights of block 0 (first slice):")
print(replayed["routing", "block0"][0])
assert error < 1e-4
