"""Stage 1 with the paper's sparse reward: SACfD on cached latents vs PPO, from the same Stage 0.

Stage 0 is trained here per task on that task's demos (cached under --work) unless --checkpoint
names one. It must be a Stage 0: models/metaworld_tiny is the demo's *Stage 2* result (0.50 on
button-press), and SACfD's demo terms pull such a head back toward plain SFT on the demos (measured:
0.50 -> 0.33-0.40 within 2k steps for every variant tried), which is not what the benchmark asks.

Per task: the same Stage 0 checkpoint, sparse reward (1 on success, episode ends on success), the
same env-step budget for both algorithms, held-out evaluation (deterministic actions) at the start
and every --eval-every steps: success-vs-steps curves. Optionally (--stage2) Stage 2 SFT on the
demos + the Stage 1 successes, evaluated again, to see how much of each Stage 1 gain it keeps.
Writes bench/results/<name>.json (machine load included) and <name>.png.

Full run (the lead, quiet machine; SACfD with config/demo.yaml's defaults (2 critics, utd 1) takes
~12 min per 8192 decisions at load ~2 with one torch thread, so ~21-25 min per task at 16384; PPO ~2.3 min per 8192):
  python bench/bench_stage1_sparse.py --tasks button-press-topdown-v3 plate-slide-v3 drawer-open-v3 \\
      --algos sac ppo --env-steps 16384 --eval-every 4096 --eval-episodes 40 --stage2
Runs made separately from the same cached Stage 0s (e.g. PPO later, or one task at a larger budget)
combine into one table and figure: --merge a.json b.json [...] --name stage1_sparse (an algo whose
budget differs from the first file's is keyed "<algo>_<env steps>").
The iRe-VLA loop instead of one Stage 1 (SACfD; 3 x (4,096 decisions + Stage 2) took 21-22 min per task
at load ~2): --algos sac --env-steps 4096 --iterations 3 --eval-every 2048. Stage 0 alone (how plain
SFT scales with demos): --algos --demos 100 --set sft.steps=1600 --work runs/demos100.
Smoke (< 1 min): --tasks button-press-topdown-v3 --algos sac --env-steps 64 --eval-episodes 2 \\
      --demos 2 --set sac.critic_pretrain_steps=5 --set sac.distill_steps=5 --name smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_figure, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="Stage 0 checkpoint for every task (default: train one per task on its demos)")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml", help="env, SFT, PPO and SAC settings")
    ap.add_argument("--tasks", nargs="+", default=["button-press-topdown-v3", "plate-slide-v3", "drawer-open-v3"])
    ap.add_argument("--algos", nargs="*", default=["sac", "ppo"], choices=["sac", "ppo"],
                    help="none: Stage 0 only (trained and evaluated, e.g. to see how it scales with --demos)")
    ap.add_argument("--env-steps", type=int, default=16384, help="Stage 1 decisions per task and algorithm")
    ap.add_argument("--eval-every", type=int, default=4096)
    ap.add_argument("--eval-episodes", type=int, default=40)
    # 8 (was 2): one batched backbone call per step for 8 episodes; each seed fixes its episode, so
    # the success rate does not depend on it (same 10-episode result with 2 and 8 envs), and 10
    # held-out episodes took 4.7 s instead of 5.5 s at load ~3 (rendering, ~6 ms a frame, is the rest).
    ap.add_argument("--eval-envs", type=int, default=8,
                    help="envs the held-out evaluation steps in lock-step (one batched backbone call per step)")
    ap.add_argument("--demos", type=int, default=20, help="expert demos per task (SAC's demo buffer, Stage 2's expert set)")
    ap.add_argument("--stage2", action="store_true", help="run Stage 2 after each Stage 1 and evaluate it")
    ap.add_argument("--iterations", type=int, default=1,
                    help="SACfD only: iRe-VLA's loop, this many times Stage 1 (--env-steps each) + Stage 2; "
                         "each Stage 1's demo buffer holds the demos + every success kept so far (Stage 2's data)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. sac.utd=2")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_stage1_sparse", help="demos and episodes")
    ap.add_argument("--name", default="stage1_sparse_sac_vs_ppo")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="RESULT_JSON",
                    help="combine these results (same Stage 0 and held-out seeds per task) instead of running")
    args = ap.parse_args(argv)
    if args.merge:
        out = merge_results([json.loads(f.read_text()) for f in args.merge], [str(f) for f in args.merge])
        write_result(args.name, out)
        plot(out, RESULTS / f"{args.name}.png")
        return 0

    import numpy as np
    import torch

    from ire_vla_ros.sim.collect import collect_expert_episodes
    from ire_vla_ros.sim.metaworld_env import heldout_seeds
    from ire_vla_ros.training.config import load_iterate_config, parse_override
    from ire_vla_ros.training.rollout import evaluate, make_envs
    from ire_vla_ros.training.stages import new_policy, stage0_sft, stage1_ppo_sim, stage1_sac_sim, stage2_sft
    from ire_vla_ros.vla.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

    overrides = dict(parse_override(s) for s in args.set)
    overrides |= {"ppo.reward": "sparse", "sac.reward": "sparse"}  # the paper's reward, for both
    cfg = load_iterate_config(args.config, overrides)
    torch.set_num_threads(args.threads)
    seeds = heldout_seeds(args.eval_episodes)
    out = {"checkpoint": str(args.checkpoint) if args.checkpoint else "per-task Stage 0", "env_steps": args.env_steps, "eval_seeds": [seeds[0], seeds[-1]],
           "eval_episodes": args.eval_episodes, "demos": args.demos, "overrides": args.set,
           "sac": dataclasses.asdict(cfg.sac), "ppo": dataclasses.asdict(cfg.ppo), "env": dataclasses.asdict(cfg.env),
           "machine": machine(), "tasks": {}}
    t_all = time.perf_counter()
    for task in args.tasks:
        work = args.work / task
        demo_paths = collect_expert_episodes(task, args.demos, work / "demos", seed0=0, noise_std=cfg.collect.noise_std,
                                             image_size=cfg.env.image_size, camera=cfg.env.camera,
                                             max_episode_steps=cfg.env.max_episode_steps,
                                             action_repeat=cfg.env.action_repeat, progress=False,
                                             only_successful=True) if not (work / "demos").is_dir() else \
            sorted((work / "demos").glob("*.h5"))[: args.demos]
        eval_envs = make_envs([task], args.eval_envs, cfg.env)
        if args.checkpoint is not None:
            ckpt = resolve_checkpoint(args.checkpoint)
        elif (work / "stage0" / "latest").is_file():
            ckpt = resolve_checkpoint(work / "stage0")
        else:  # Stage 0 SFT (LoRA + head) on this task's demos, as `ire-vla train sft` would
            t = time.perf_counter()
            policy = new_policy(cfg, eval_envs[0].action_spec, eval_envs[0].joint_names, "cpu")
            s0 = stage0_sft(policy, demo_paths, cfg.sft, progress=False)
            ckpt = save_checkpoint(policy, work / "stage0", stage="sft", iteration=0, metadata={"train": s0})
            print(f"[{task}] Stage 0 trained in {time.perf_counter() - t:.0f}s: {ckpt}", flush=True)

        def eval_fn(policy, _envs=eval_envs, _task=task):
            r = evaluate(policy, _envs, seeds)[_task]
            print(f"[{_task}] held-out success {r['success_rate']:.2f} ({time.strftime('%H:%M:%S')})", flush=True)
            return {"success_rate": r["success_rate"], "successes": r["successes"], "episodes": r["episodes"]}

        def report(stage, fraction, message, _task=task):
            print(f"[{_task}] {stage} {message}", flush=True)

        # The Stage 0 evaluation is cached beside the work dir's demos, keyed by checkpoint and seeds:
        # repeated tuning runs from one Stage 0 (same env settings) skip ~20 s of identical episodes.
        env_key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg.env), sort_keys=True).encode()).hexdigest()[:8]
        s0_cache = work / f"stage0_eval_{Path(str(ckpt)).name}_{env_key}_{len(seeds)}_{seeds[0]}.json"
        if s0_cache.is_file():
            stage0 = json.loads(s0_cache.read_text())
            print(f"[{task}] Stage 0 evaluation cached: {s0_cache}", flush=True)
        else:
            stage0 = eval_fn(load_checkpoint(ckpt))
            s0_cache.write_text(json.dumps(stage0))
        entry = {"checkpoint": str(ckpt), "stage0": stage0, "algos": {}}
        out["tasks"][task] = entry
        write_result(args.name, {**out, "total_seconds": round(time.perf_counter() - t_all, 1)})
        print(f"[{task}] Stage 0: {entry['stage0']['success_rate']:.2f}", flush=True)
        for algo in args.algos:
            policy = load_checkpoint(ckpt)
            torch.manual_seed(0)
            envs = make_envs([task], (cfg.sac if algo == "sac" else cfg.ppo).num_envs, cfg.env)
            ep_root = work / f"{algo}_episodes"
            load0, t = os.getloadavg()[0], time.perf_counter()
            try:
                if algo == "sac" and args.iterations > 1:
                    res = iterate_sac(policy, envs, demo_paths, cfg, args, ep_root, eval_fn, report)
                    res["gain"] = res["final"]["success_rate"] - entry["stage0"]["success_rate"]
                    print(f"[{task}] sac x{args.iterations}: {res['final']['success_rate']:.2f} ({res['gain']:+.2f}) "
                          f"in {res['seconds']:.0f}s", flush=True)
                    entry["algos"][algo] = res
                    out["tasks"][task] = entry
                    write_result(args.name, {**out, "total_seconds": round(time.perf_counter() - t_all, 1),
                                             "loadavg_end": os.getloadavg()})
                    continue
                if algo == "sac":
                    sac = dataclasses.replace(cfg.sac, total_env_steps=args.env_steps)
                    stats = stage1_sac_sim(policy, envs, demo_paths, sac, episode_root=ep_root, iteration=1,
                                           progress=False, eval_fn=eval_fn, eval_every=args.eval_every, report=report)
                else:
                    ppo = dataclasses.replace(cfg.ppo, total_env_steps=args.env_steps)
                    stats = stage1_ppo_sim(policy, envs, ppo, episode_root=ep_root, iteration=1, progress=False,
                                           eval_fn=eval_fn, eval_every=args.eval_every, report=report)
            finally:
                for e in envs:
                    e.close()
            res = {"seconds": round(time.perf_counter() - t, 1), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                   "curve": stats["curve"], "final": stats["curve"][-1], "train_episodes": stats["episodes"],
                   "train_successes": stats["successes"],
                   "train_log": [{k: u[k] for k in u if k in ("env_steps", "train_success_rate", "q_mean", "alpha",
                                                              "bc_weight", "critic_loss", "v_loss", "log_std")} for u in stats["updates"]]}
            res["gain"] = res["final"]["success_rate"] - entry["stage0"]["success_rate"]
            print(f"[{task}] {algo}: {res['final']['success_rate']:.2f} ({res['gain']:+.2f}) in {res['seconds']:.0f}s", flush=True)
            if args.stage2:
                t = time.perf_counter()
                s2 = stage2_sft(policy, demo_paths, stats["saved_episodes"], cfg.stage2_sft or cfg.sft, progress=False)
                res["stage2"] = {**eval_fn(policy), "seconds": round(time.perf_counter() - t, 1),
                                 "online_episodes": len(stats["saved_episodes"]), "loss_last": s2["loss_last"]}
                gain = res["gain"]
                res["stage2"]["kept_fraction_of_gain"] = (
                    (res["stage2"]["success_rate"] - entry["stage0"]["success_rate"]) / gain if gain > 0 else None)
                print(f"[{task}] {algo} + Stage 2: {res['stage2']['success_rate']:.2f}", flush=True)
            entry["algos"][algo] = res
            out["tasks"][task] = entry
            write_result(args.name, {**out, "total_seconds": round(time.perf_counter() - t_all, 1),
                                     "loadavg_end": os.getloadavg()})
        for e in eval_envs:
            e.close()
    out["total_seconds"] = round(time.perf_counter() - t_all, 1)
    out["loadavg_end"] = os.getloadavg()
    write_result(args.name, out)
    if any(entry["algos"] for entry in out["tasks"].values()):  # Stage 0 alone: a number, no curve
        plot(out, RESULTS / f"{args.name}.png")
    return 0


def iterate_sac(policy, envs, demo_paths, cfg, args, ep_root: Path, eval_fn, report) -> dict:
    """iRe-VLA's loop from Stage 0: K x (Stage 1 SACfD for --env-steps, Stage 2 SFT), evaluated after
    every stage. Stage 2 fits demos + all successes so far; the next Stage 1 starts from that head, so
    its demo buffer (the behaviour regulariser's target, the critic's pre-training) is the same set:
    demos alone would pull the head back to plain SFT on the demos (the module docstring's finding)."""
    from ire_vla_ros.training.stages import stage1_sac_sim, stage2_sft

    t, load0 = time.perf_counter(), os.getloadavg()[0]
    kept: list[str] = []
    curve, stages, train_log, episodes, successes = [], [], [], 0, 0
    for k in range(1, args.iterations + 1):
        sac = dataclasses.replace(cfg.sac, total_env_steps=args.env_steps)
        offset = (k - 1) * args.env_steps
        demo_buffer = list(demo_paths) + kept
        stats = stage1_sac_sim(policy, envs, demo_buffer, sac, episode_root=ep_root / f"iter{k}",
                               iteration=k, progress=False, seed_start=1000 * k, eval_fn=eval_fn,
                               eval_every=args.eval_every, report=report)
        curve += [{**c, "env_steps": c["env_steps"] + offset, "stage": f"iter{k}_stage1"} for c in stats["curve"]]
        train_log += [{"env_steps": u["env_steps"] + offset, **{key: u[key] for key in u if key in (
            "train_success_rate", "q_mean", "alpha", "bc_weight", "critic_loss", "log_std")}} for u in stats["updates"]]
        kept += stats["saved_episodes"]
        episodes, successes = episodes + stats["episodes"], successes + stats["successes"]
        s2 = stage2_sft(policy, demo_paths, kept, cfg.stage2_sft or cfg.sft, progress=False)
        curve.append({"env_steps": k * args.env_steps, **eval_fn(policy), "stage": f"iter{k}_stage2"})
        stages.append({"iteration": k, "stage1_final": stats["curve"][-1]["success_rate"],
                       "stage2": curve[-1]["success_rate"], "demo_buffer_episodes": len(demo_buffer),
                       "stage2_online_episodes": len(kept), "stage2_loss_last": s2["loss_last"],
                       "seconds_so_far": round(time.perf_counter() - t, 1)})
        report("iterate", k / args.iterations, f"iteration {k}: Stage 1 {stages[-1]['stage1_final']:.2f}, "
                                               f"Stage 2 {stages[-1]['stage2']:.2f} ({len(kept)} successes kept)")
    return {"iterations": args.iterations, "seconds": round(time.perf_counter() - t, 1), "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0], "curve": curve, "final": curve[-1], "stages": stages,
            "train_episodes": episodes, "train_successes": successes, "train_log": train_log}


def merge_results(results: list[dict], names: list[str]) -> dict:
    """One table from several runs: per task, every algo of every run, refusing mismatched baselines."""
    base = results[0]
    out = {**{k: v for k, v in base.items() if k != "tasks"}, "merged_from": names, "tasks": {},
           "runs": [{"file": n, "env_steps": r["env_steps"], "overrides": r["overrides"], "machine": r["machine"],
                     "total_seconds": r.get("total_seconds"), "loadavg_end": r.get("loadavg_end")}
                    for n, r in zip(names, results)]}
    for name, r in zip(names, results):
        if (r["eval_seeds"], r["eval_episodes"]) != (base["eval_seeds"], base["eval_episodes"]):
            raise SystemExit(f"{name}: held-out seeds {r['eval_seeds']} x {r['eval_episodes']} differ from {names[0]}'s")
        for task, entry in r["tasks"].items():
            have = out["tasks"].setdefault(task, {"checkpoint": entry["checkpoint"], "stage0": entry["stage0"], "algos": {}})
            if Path(have["checkpoint"]).name != Path(entry["checkpoint"]).name:
                raise SystemExit(f"{name}: {task} starts from {entry['checkpoint']}, not {have['checkpoint']}")
            for algo, res in entry["algos"].items():
                key = algo if r["env_steps"] == base["env_steps"] else f"{algo}_{r['env_steps']}"
                if key in have["algos"]:  # the same algo and budget twice: name the run
                    key = f"{key}_{Path(name).stem}"
                have["algos"][key] = res
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(out["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5 * len(tasks), 6.5), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entry = out["tasks"][task]
        for algo, res in entry["algos"].items():
            x = [c["env_steps"] for c in res["curve"]]
            y = np.array([c["success_rate"] for c in res["curve"]])
            n = np.array([max(c["episodes"], 1) for c in res["curve"]])
            label = algo.upper().replace("_", " @ ", 1)  # "sac_16384": a merged run at another budget
            ax.errorbar(x, y, yerr=np.sqrt(y * (1 - y) / n), marker="o", capsize=3, label=label)
            s2 = [(c["env_steps"], c["success_rate"]) for c in res["curve"] if c.get("stage", "").endswith("stage2")]
            if s2:  # iterations: the Stage 2 points inside the curve
                ax.plot(*zip(*s2), marker="*", markersize=12, linestyle="none", label=f"{label}: after Stage 2")
            if "stage2" in res:
                ax.plot([x[-1]], [res["stage2"]["success_rate"]], marker="*", markersize=12, linestyle="none",
                        label=f"{label} + Stage 2")
        ax.axhline(entry["stage0"]["success_rate"], color="gray", linestyle="--", label="Stage 0")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("env steps (decisions)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"held-out success ({out['eval_episodes']} ep., ±1 s.e.)")
    loops = {res.get("iterations") for e in out["tasks"].values() for res in e["algos"].values()} - {None}
    fig.suptitle(f"iRe-VLA loop, sparse reward: {max(loops)} x (SACfD Stage 1 + Stage 2) from Stage 0" if loops
                 else "Stage 1 with sparse reward: SACfD vs PPO from the same Stage 0", fontsize=9 if len(tasks) == 1 else 12)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
