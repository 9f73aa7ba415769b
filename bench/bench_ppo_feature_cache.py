"""One Stage 1 PPO update with cached frozen-backbone features vs the same update re-running the
backbone for every minibatch of every epoch. Same batch, same seeds, measured side by side; the
ratio goes to bench/results/ppo_feature_cache.json.

The batch is a real rollout of a tiny policy in Metaworld (8 envs x 64 steps by default).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="button-press-topdown-v3")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--rollout-len", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of each variant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from ire_vla_ros.training.config import EnvConfig, PPOConfig
    from ire_vla_ros.training.ppo import compute_gae, ppo_update
    from ire_vla_ros.training.rollout import RolloutCollector, make_envs
    from ire_vla_ros.training.stages import begin_stage1
    from ire_vla_ros.vla.testing import make_tiny_policy

    torch.set_num_threads(args.threads)
    cfg = PPOConfig(update_epochs=args.epochs, minibatch_size=args.minibatch, target_kl=None, num_envs=args.num_envs)
    policy = make_tiny_policy()
    begin_stage1(policy, cfg)
    envs = make_envs([args.task], args.num_envs, EnvConfig())
    batch = RolloutCollector(envs, cfg, keep_images=True).collect(policy, args.rollout_len)
    for e in envs:
        e.close()
    compute_gae(batch, cfg.gamma, cfg.gae_lambda)
    start_state = copy.deepcopy(policy.state_dict())

    times = {"cached": [], "recompute": []}
    for _ in range(args.repeats):
        for variant in ("cached", "recompute"):
            policy.load_state_dict(start_state)
            opt = begin_stage1(policy, cfg)
            policy.load_state_dict(start_state)
            t = time.perf_counter()
            ppo_update(policy, opt, batch, cfg, recompute_features=(variant == "recompute"))
            times[variant].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    write_result("ppo_feature_cache", {
        "what": "one PPO update (all epochs) on one rollout batch, VLM frozen",
        "batch_steps": args.num_envs * args.rollout_len, "epochs": args.epochs, "minibatch": args.minibatch,
        "seconds_cached": best["cached"], "seconds_recompute_backbone": best["recompute"],
        "speedup_ratio_recompute_over_cached": best["recompute"] / best["cached"],
        "all_runs_seconds": times, "machine": machine(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
