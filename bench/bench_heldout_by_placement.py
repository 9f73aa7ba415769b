"""Which held-out placements a checkpoint solves: success vs the object's position.

Runs a checkpoint with deterministic actions on the sparse benchmark's held-out seeds (one episode
each, the benchmark's 75-decision limit and action repeat) and records, per episode, the placement
Metaworld sampled (its `_last_rand_vec`: object x, y, z, ...) and the outcome. A policy that
perceives the object succeeds across the range; one that ignores it succeeds only where the
object sits near where the demos' average motion goes. Writes bench/results/<name>.json and a
scatter plot (<name>.png, x-y of the object, filled = success).

  python bench/bench_heldout_by_placement.py --task button-press-topdown-v3 \\
      --checkpoint runs/bench_stage1_sparse/button-press-topdown-v3/stage0 --name placement_button_stage0
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, run_episode, save_figure, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--checkpoint", type=Path, action="append", required=True,
                    help="a checkpoint (or checkpoint root); repeat to compare several on the same seeds")
    ap.add_argument("--label", action="append", default=[], help="one per --checkpoint (default: its folder)")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml", help="env settings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="heldout_by_placement")
    args = ap.parse_args(argv)
    if args.label and len(args.label) != len(args.checkpoint):
        raise SystemExit("give one --label per --checkpoint (or none)")

    import numpy as np
    import torch

    from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv, heldout_seeds
    from ire_vla_ros.training.config import load_iterate_config
    from ire_vla_ros.vla.checkpoint import load_checkpoint, resolve_checkpoint

    torch.set_num_threads(args.threads)
    cfg = load_iterate_config(args.config, {})
    seeds = heldout_seeds(args.episodes)
    out = {"task": args.task, "eval_seeds": [seeds[0], seeds[-1]], "episodes": args.episodes,
           "max_episode_steps": cfg.env.max_episode_steps, "action_repeat": cfg.env.action_repeat,
           "machine": machine(), "checkpoints": {}}
    t0 = time.perf_counter()
    for k, ck in enumerate(args.checkpoint):
        label = args.label[k] if args.label else ck.name
        path = resolve_checkpoint(ck)
        policy = load_checkpoint(path).eval()
        # Render at the size the checkpoint was trained on (the tiny preset's image_size); a
        # pretrained backbone's processor resizes whatever it gets.
        size = getattr(policy.backbone, "image_size", cfg.env.image_size)
        env = MetaworldTaskEnv(args.task, image_size=size, camera=cfg.env.camera,
                               max_episode_steps=cfg.env.max_episode_steps, seed=0, render=True,
                               action_repeat=cfg.env.action_repeat)
        try:
            rows = []
            for seed in seeds:
                info = run_episode(env, seed, lambda obs: policy.act_batch(
                    obs.image[None], obs.state[None], [obs.instruction], True).actions[0])
                rows.append({"seed": seed, "placement": [round(float(x), 4) for x in env.placement],
                             "success": bool(info["success"]), "decisions": env.steps})
            x = np.array([r["placement"][0] for r in rows])
            ok = np.array([r["success"] for r in rows])
            inner = np.abs(x - np.median(x)) <= np.quantile(np.abs(x - np.median(x)), 0.5)
            entry = {"checkpoint": str(path), "image_size": size, "success_rate": float(ok.mean()), "episodes": rows,
                     # success among the half of the placements nearest the median x, and the other half
                     "success_inner_half_x": float(ok[inner].mean()), "success_outer_half_x": float(ok[~inner].mean())}
            out["checkpoints"][label] = entry
            print(f"{label}: success {entry['success_rate']:.2f}; inner half of x {entry['success_inner_half_x']:.2f}, "
                  f"outer half {entry['success_outer_half_x']:.2f}", flush=True)
        finally:
            env.close()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["loadavg_end"] = os.getloadavg()
    write_result(args.name, out)
    plot(out, RESULTS / f"{args.name}.png")
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(out["checkpoints"])
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        entry = out["checkpoints"][label]
        for success, marker, colour in ((True, "o", "tab:green"), (False, "x", "tab:red")):
            pts = [r["placement"][:2] for r in entry["episodes"] if r["success"] is success]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=colour, label="success" if success else "failure")
        ax.set_title(f"{label}: {entry['success_rate']:.2f}", fontsize=9)
        ax.set_xlabel("object x (m)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("object y (m)")
    fig.suptitle(f"{out['task']}: held-out outcome by placement ({out['episodes']} seeds, deterministic)", fontsize=10)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
