"""`ire-vla iterate` / `ire-vla demo`: the whole iRe-VLA loop in Metaworld.

collect expert demos -> Stage 0 SFT -> eval -> K x (Stage 1 (frozen VLM) -> eval -> Stage 2 SFT -> eval)
Stage 1 is SACfD on cached latents with the expert demos in its demo buffer (`stage1.algo: sac`) or
PPO (`stage1.algo: ppo`).
Every stage writes a checkpoint; the results JSON, a success-rate plot and evaluation videos land in
the output directory.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..episodes.store import scan_episodes
from ..vla.checkpoint import resolve_device, save_checkpoint
from . import tb
from .config import IterateConfig
from .rollout import evaluate, make_envs
from .stages import new_policy, stage0_sft, stage1_ppo_sim, stage1_sac_sim, stage2_sft

log = logging.getLogger(__name__)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class IterationRunner:
    def __init__(self, cfg: IterateConfig, out_dir: Path, *, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.episodes = self.out / "episodes"
        self.ckpts = self.out / "checkpoints"
        self.results: dict = {"config": cfg.to_dict(), "stages": [], "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "device": self.device,
            "cpu_count": os.cpu_count(), "torch_threads": cfg.torch_threads}}
        self._eval_envs = None

    # -------------------------------------------------------------- helpers
    def eval_envs(self):
        if self._eval_envs is None:
            self._eval_envs = make_envs(self.cfg.tasks, 2, self.cfg.env)
        return self._eval_envs

    def evaluate(self, policy, label: str) -> dict:
        from ..sim.metaworld_env import heldout_seeds

        e = self.cfg.eval
        seeds = heldout_seeds(e.episodes_per_task)
        video = self.out / "videos" / f"{label}.mp4" if e.videos else None
        with tqdm(total=e.episodes_per_task * len(self.cfg.tasks), desc=f"eval {label}", disable=not self.progress) as bar:
            res = evaluate(policy, self.eval_envs(), seeds, video_path=video, progress=bar)
        res["_seeds"] = [seeds[0], seeds[-1]]
        return res

    def record(self, label: str, stage: str, iteration: int, policy, eval_res: dict, train_stats: dict, seconds: float):
        ckpt = save_checkpoint(policy, self.ckpts, stage=stage, iteration=iteration,
                               metadata={"label": label, "eval": eval_res, "tasks": self.cfg.tasks})
        entry = {"label": label, "stage": stage, "iteration": iteration, "checkpoint": str(ckpt),
                 "seconds": round(seconds, 1), "eval": eval_res, "train": train_stats}
        self.results["stages"].append(entry)
        tb.log_eval(eval_res, step=len(self.results["stages"]) - 1)  # x axis: stage 0, 1, 2, ...
        rates = ", ".join(f"{t}: {r['success_rate']:.2f}" for t, r in eval_res.items() if not t.startswith("_"))
        log.info("%s done in %.0fs: %s", label, seconds, rates)
        print(f"[{label}] {rates}  ({seconds:.0f}s)", flush=True)
        self.save_results()

    def save_results(self):
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=float))

    # -------------------------------------------------------------- the loop
    def run(self) -> dict:
        cfg = self.cfg
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        t_start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)

        t = time.time()
        expert_paths = self.collect()
        self.results["collect_seconds"] = round(time.time() - t, 1)
        env0 = self.eval_envs()[0]
        policy = new_policy(cfg, env0.action_spec, env0.joint_names, self.device)

        t = time.time()
        stats = stage0_sft(policy, expert_paths, cfg.sft, progress=self.progress)
        self.record("stage0_sft", "sft", 0, policy, self.evaluate(policy, "stage0_sft"), stats, time.time() - t)

        algo = cfg.stage1.algo
        for k in range(1, cfg.iterations + 1):
            t = time.time()
            num_envs = (cfg.sac if algo == "sac" else cfg.ppo).num_envs
            envs = make_envs(cfg.tasks, max(1, num_envs // len(cfg.tasks)), cfg.env)
            try:
                if algo == "sac":
                    # SACfD's demo buffer is what the head was last fitted to: the demos, and from the
                    # second iteration on every success Stage 2 fitted too (demos alone pulled a Stage 2
                    # head back toward plain SFT on the demos: bench/bench_stage1_sparse.py). Latents
                    # are recomputed: Stage 2 moved LoRA.
                    demo_buffer = list(expert_paths) + self.kept_successes()
                    stats = stage1_sac_sim(policy, envs, demo_buffer, cfg.sac, episode_root=self.episodes / f"rl_iter{k}",
                                           iteration=k, progress=self.progress, seed_start=1000 * k)
                else:
                    stats = stage1_ppo_sim(policy, envs, cfg.ppo, episode_root=self.episodes / f"rl_iter{k}",
                                           iteration=k, progress=self.progress, seed_start=1000 * k)
            finally:
                for env in envs:
                    env.close()
            label = f"iter{k}_stage1_{algo}"
            self.record(label, "rl", k, policy, self.evaluate(policy, label), stats, time.time() - t)

            t = time.time()
            online = self.kept_successes()
            s2 = cfg.stage2_sft or cfg.sft
            stats = stage2_sft(policy, expert_paths, online, s2, progress=self.progress)
            self.record(f"iter{k}_stage2_sft", "sft", k, policy, self.evaluate(policy, f"iter{k}_stage2_sft"),
                        stats, time.time() - t)

        self.results["total_seconds"] = round(time.time() - t_start, 1)
        self.save_results()
        plot_success_rates(self.results, self.out / "success_rate.png")
        for env in self._eval_envs or []:
            env.close()
        return self.results

    def kept_successes(self) -> list[Path]:
        """The successful Stage 1 episodes of every iteration so far (Stage 2's online data)."""
        return list(scan_episodes(self.episodes, sources=["rl"], successful_only=True).episodes)

    def collect(self) -> list[Path]:
        from ..sim.collect import collect_expert_episodes

        c = self.cfg.collect
        root = self.episodes / "teleop"
        existing = scan_episodes(root, sources=["teleop"]).episodes if root.exists() else []
        if len(existing) >= c.episodes_per_task * len(self.cfg.tasks):
            log.info("reusing %d expert episodes in %s", len(existing), root)
            return existing
        paths = []
        for task in self.cfg.tasks:
            paths += collect_expert_episodes(task, c.episodes_per_task, root / task, seed0=c.seed0,
                                             noise_std=c.noise_std, image_size=self.cfg.env.image_size,
                                             camera=self.cfg.env.camera,
                                             max_episode_steps=self.cfg.env.max_episode_steps,
                                             action_repeat=self.cfg.env.action_repeat, progress=self.progress)
        return paths


def success_table(results: dict) -> str:
    stages = results["stages"]
    tasks = [t for t in stages[0]["eval"] if not t.startswith("_")] if stages else []
    head = f"{'stage':<22}" + "".join(f"{t:>26}" for t in tasks) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]
    for s in stages:
        rates = [s["eval"][t]["success_rate"] for t in tasks]
        cells = "".join(f"{r:>20.2f} ({s['eval'][t]['successes']:>2}/{s['eval'][t]['episodes']:<2})" for t, r in zip(tasks, rates))
        lines.append(f"{s['label']:<22}{cells}{np.mean(rates):>8.2f}")
    if stages:
        seeds = stages[0]["eval"].get("_seeds")
        lines.append(f"held-out evaluation seeds {seeds[0]}..{seeds[1]} per task, deterministic (mean) actions")
    return "\n".join(lines)


def plot_success_rates(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = results["stages"]
    tasks = [t for t in stages[0]["eval"] if not t.startswith("_")]
    labels = [s["label"] for s in stages]
    x = np.arange(len(stages))
    width = 0.8 / max(len(tasks), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(stages), 4))
    for i, task in enumerate(tasks):
        rates = np.array([s["eval"][task]["success_rate"] for s in stages])
        n = np.array([max(s["eval"][task]["episodes"], 1) for s in stages])
        stderr = np.sqrt(rates * (1 - rates) / n)  # binomial standard error: how much to trust a bar
        ax.bar(x + (i - (len(tasks) - 1) / 2) * width, rates, width, yerr=stderr, capsize=3, label=task)
    mean = [np.mean([s["eval"][t]["success_rate"] for t in tasks]) for s in stages]
    ax.plot(x, mean, "k-o", label="mean")
    ax.set_xticks(x, labels, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (held-out seeds, ±1 s.e.)")
    ax.set_title("iRe-VLA in Metaworld: success rate after each stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
