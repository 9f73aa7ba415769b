"""Ablation: Stage 1 PPO with the VLM frozen (iRe-VLA) vs PPO updating the whole model (LoRA too).

Both start from the same Stage 0 checkpoint, use the same PPO hyperparameters, env-step budget and
seeds, and are evaluated on the same held-out seeds. Writes bench/results/ablation_full_model_ppo.json
and a PNG beside it. Default checkpoint: the Stage 0 checkpoint of `make demo` (runs/demo).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def default_checkpoint() -> Path:
    results = ROOT / "runs" / "demo" / "results.json"
    if results.is_file():
        return Path(json.loads(results.read_text())["stages"][0]["checkpoint"])
    return ROOT / "models" / "metaworld_tiny"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="Stage 0 checkpoint (default: demo's)")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    ap.add_argument("--env-steps", type=int, default=None, help="PPO budget per variant (default: config's)")
    ap.add_argument("--eval-episodes", type=int, default=20)
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from ire_vla_ros.sim.metaworld_env import heldout_seeds
    from ire_vla_ros.training.config import load_iterate_config
    from ire_vla_ros.training.rollout import evaluate, make_envs
    from ire_vla_ros.training.stages import stage1_ppo_sim
    from ire_vla_ros.vla.checkpoint import load_checkpoint, resolve_checkpoint

    cfg = load_iterate_config(args.config)
    torch.set_num_threads(cfg.torch_threads)
    ckpt = resolve_checkpoint(args.checkpoint or default_checkpoint())
    eval_envs = make_envs(cfg.tasks, 2, cfg.env)
    seeds = heldout_seeds(args.eval_episodes)
    out = {"checkpoint": str(ckpt), "tasks": cfg.tasks, "eval_seeds": [seeds[0], seeds[-1]], "variants": {}}
    base = load_checkpoint(ckpt)
    out["stage0"] = evaluate(base, eval_envs, seeds)
    for name, frozen in (("frozen_vlm_iRe-VLA", True), ("full_model_ppo", False)):
        ppo = dataclasses.replace(cfg.ppo, freeze_backbone=frozen, keep_successful=False,
                                  total_env_steps=args.env_steps or cfg.ppo.total_env_steps)
        policy = load_checkpoint(ckpt)
        envs = make_envs(cfg.tasks, max(1, ppo.num_envs // len(cfg.tasks)), cfg.env)
        torch.manual_seed(ppo.seed)
        t = time.perf_counter()
        stats = stage1_ppo_sim(policy, envs, ppo, episode_root=None, iteration=1, seed_start=1000)
        seconds = time.perf_counter() - t
        for e in envs:
            e.close()
        res = evaluate(policy, eval_envs, seeds)
        out["variants"][name] = {"eval": res, "train_seconds": seconds, "env_steps": ppo.total_env_steps,
                                 "train_success_curve": [u["train_success_rate"] for u in stats["updates"]]}
        print(name, {t: r["success_rate"] for t, r in res.items()}, f"{seconds:.0f}s", flush=True)
    for e in eval_envs:
        e.close()
    out["machine"] = machine()
    write_result("ablation_full_model_ppo", out)
    plot(out, RESULTS / "ablation_full_model_ppo.png")
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = ["stage0"] + list(out["variants"])
    evals = [out["stage0"]] + [v["eval"] for v in out["variants"].values()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, task in enumerate(out["tasks"]):
        ax.bar(x + (i - 0.5) * 0.4, [e[task]["success_rate"] for e in evals], 0.4, label=task)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (held-out seeds)")
    ax.set_title("Stage 1: frozen VLM vs full-model PPO (same budget, seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
