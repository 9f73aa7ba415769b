"""What the sparse-reward benchmark's held-out episodes allow: the scripted Metaworld expert on the
same 40 held-out seeds, the same 75-decision limit and action repeat as bench_stage1_sparse.py,
without and with the demos' action noise. If the expert succeeds everywhere, a policy's failures
there are the policy's (perception, precision), not the time limit or the placements.
Writes bench/results/expert_heldout_ceiling.json.

  python bench/bench_expert_ceiling.py [--tasks ...] [--episodes 40]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_episode, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["button-press-topdown-v3", "plate-slide-v3", "drawer-open-v3"])
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml", help="env settings and demo noise")
    ap.add_argument("--name", default="expert_heldout_ceiling")
    args = ap.parse_args(argv)

    import numpy as np

    from ire_vla_ros.sim.collect import noise_rng, noisy_expert_action
    from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv, heldout_seeds
    from ire_vla_ros.training.config import load_iterate_config

    cfg = load_iterate_config(args.config, {})
    seeds = heldout_seeds(args.episodes)
    out = {"eval_seeds": [seeds[0], seeds[-1]], "episodes": args.episodes, "max_episode_steps": cfg.env.max_episode_steps,
           "action_repeat": cfg.env.action_repeat, "machine": machine(), "tasks": {}}
    t0 = time.perf_counter()
    for task in args.tasks:
        env = MetaworldTaskEnv(task, max_episode_steps=cfg.env.max_episode_steps, seed=0, render=False,
                               action_repeat=cfg.env.action_repeat)
        try:
            for noise in (0.0, cfg.collect.noise_std):
                success, decisions = [], []
                for seed in seeds:
                    rng = noise_rng(seed, noise)
                    info = run_episode(env, seed, lambda _obs: noisy_expert_action(env, rng, noise))
                    success.append(bool(info["success"]))
                    decisions.append(env.steps)
                r = {"success_rate": float(np.mean(success)), "mean_decisions": float(np.mean(decisions)),
                     "max_decisions": int(max(decisions))}
                out["tasks"].setdefault(task, {})[f"noise_{noise:g}"] = r
                print(f"{task} expert (noise {noise:g}): success {r['success_rate']:.2f}, "
                      f"{r['mean_decisions']:.1f} decisions on average (max {r['max_decisions']})", flush=True)
        finally:
            env.close()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["loadavg_end"] = os.getloadavg()
    print(f"written: {write_result(args.name, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
