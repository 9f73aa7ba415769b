"""Online RL through ROS 2 in simulation (issue 7 item 6): does the actor-learner loop learn?

Real nodes over real DDS in one process (sim_node = Metaworld, policy_node, recorder_node,
reward_node with the sim's sparse success, trainer_node; teleop_node for the demonstrations) and
the learner as trainer_node's child process. The policy's commands drive the sim; every episode
the recorder saves goes to the learner; new heads swap in between episodes.

  1. copy the Stage 0 checkpoint into <work>/checkpoints (the policy and the trainer share that root)
  2. record --demos scripted-expert demonstrations (teleop episodes: the demo buffer)
  3. ~/start_online_rl, enable the policy, run policy episodes back to back for --minutes of wall clock
  4. ~/stop_online_rl (with --stage2: then the offline iteration -> checkpoint -> reload)
Result: success rate of the last 20 episodes vs the first 20, the curve (PNG) and the head versions
per episode, machine load. bench/results/<name>.json + .png.

Those episodes explore (the head's stochastic actions): their success mixes learning with the
exploration noise the temperature sets. So the head the policy runs is also copied every
--heldout-every-min minutes and, after the run (ROS closed), evaluated with deterministic actions on
--heldout-episodes held-out seeds in plain Metaworld (the settings of bench_stage1_sparse.py:
--config's env, 75-decision limit): the same measure as the offline benchmark, per wall-clock minute.

Full run (the lead, quiet machine, ~35 min on 2 cores):
  python bench/bench_online_rl_sim.py --minutes 30 --demos 20
Smoke (~2 min): python bench/bench_online_rl_sim.py --minutes 0.5 --demos 2 --max-steps 20 --window 2 \\
      --learner-set sac.critic_pretrain_steps=5 --learner-set sac.distill_steps=5 --name online_rl_sim_smoke \\
      [--stage2 --train-set sft.steps=10 --train-set sac.offline_updates=20 --train-set sac.critic_pretrain_steps=5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK = "button-press-topdown-v3"
SIM_POLICY = {"command_frame": "world", "workspace_enabled": False, "servo_switch_service": "",
              "max_translation_m": 0.035}  # = bringup MODE_OVERRIDES["sim"]["policy_node"]


class Rig:
    """The nodes on one SingleThreadedExecutor in a thread, plus a probe node."""

    def __init__(self, domain: int, work: Path, args):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.parameter import Parameter
        from std_msgs.msg import String

        from ire_vla_ros.nodes.policy_node import PolicyNode
        from ire_vla_ros.nodes.recorder_node import RecorderNode
        from ire_vla_ros.nodes.reward_node import RewardNode
        from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS
        from ire_vla_ros.nodes.sim_node import SimNode
        from ire_vla_ros.nodes.teleop_node import TeleopNode
        from ire_vla_ros.nodes.trainer_node import TrainerNode

        self._Parameter = Parameter
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.probe = Node("bench_probe", context=self.ctx)
        self.nodes = [self.probe]
        self.executor.add_node(self.probe)
        ckpts, episodes = work / "checkpoints", work / "episodes"
        self.sim = self.add(SimNode, task=args.task, rate_hz=args.rate, seed=args.seed, action_repeat=2)
        self.teleop = self.add(TeleopNode, mode="scripted_expert", action_spec="metaworld_4d", rate_hz=args.rate,
                               frame_id="world", enabled=False, servo_switch_service="")
        self.policy = self.add(PolicyNode, checkpoint=str(ckpts), device="cpu", torch_num_threads=1,
                               control_rate_hz=args.rate, prefer_cv_bridge=False, **SIM_POLICY)
        self.reward = self.add(RewardNode, backend="sim", max_episode_steps=args.max_steps,
                               action_topic="/teleop_node/action")
        self.recorder = self.add(RecorderNode, episodes_dir=str(episodes), source="teleop", task=args.task,
                                 action_topic="/teleop_node/action",
                                 start_services=["/sim_node/reset", "/reward_node/start_episode"])
        # 256 MB per buffer: 40k tiny-preset transitions (6,308 B each), more than 30 min at 10 Hz
        sets = ["torch_threads=1", "sac.buffer_bytes=268435456", "sac.demo_buffer_bytes=268435456", *args.learner_set]
        learner_args = [x for s in sets for x in ("--set", s)]
        self.trainer = self.add(TrainerNode, episodes_dir=str(episodes), checkpoints_dir=str(ckpts), device="cpu",
                                online_learner_args=learner_args, online_snapshot_every_s=args.snapshot_every_s,
                                online_snapshot_every_episodes=args.snapshot_every_episodes,
                                online_stage2_on_stop=args.stage2, online_stop_timeout_s=120.0,
                                **({"extra_args": [x for s in args.train_set for x in ("--set", s)]} if args.train_set else {}))
        self.saved, self.status = [], []
        self.probe.create_subscription(String, "/recorder_node/episode_saved", self.saved.append, RELIABLE_QOS)
        self.probe.create_subscription(String, "/trainer_node/status", self.status.append, LATCHED_QOS)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def add(self, cls, **params):
        node = cls(context=self.ctx, parameter_overrides=[self._Parameter(k, value=v) for k, v in params.items()])
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def call(self, srv_type, name, request=None, timeout=30.0):
        client = self.probe.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{name} not available")
        done = threading.Event()
        fut = client.call_async(request or srv_type.Request())
        fut.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            raise RuntimeError(f"{name} did not answer")
        self.probe.destroy_client(client)
        return fut.result()

    def set(self, node, **params):
        for k, v in params.items():
            r = node.set_parameters([self._Parameter(k, value=v)])[0]
            if not r.successful:
                raise RuntimeError(f"{node.get_name()}.{k}: {r.reason}")

    def trainer_status(self) -> dict:
        return json.loads(self.status[-1].data) if self.status else {}

    def episode(self, timeout: float = 120.0) -> str:
        from std_srvs.srv import Trigger

        before = len(self.saved)
        r = self.call(Trigger, "/recorder_node/start_episode")
        if not r.success:
            raise RuntimeError(f"start_episode: {r.message}")
        wait_for(lambda: len(self.saved) > before, timeout, "episode saved")
        return self.saved[-1].data

    def close(self):
        import rclpy

        self.executor.shutdown()
        for n in reversed(self.nodes):
            n.destroy_node()
        rclpy.shutdown(context=self.ctx)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def copy_checkpoint(src: Path, root: Path) -> Path:
    from ire_vla_ros.vla.checkpoint import resolve_checkpoint

    src = resolve_checkpoint(src)
    dst = root / src.name
    shutil.copytree(src, dst)
    (root / "latest").write_text(dst.name + "\n")
    return resolve_checkpoint(root)


def rate(xs) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def plot(path: Path, rows: list[dict], window: int, task: str, heldout: list[dict] | None = None,
         stage2: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = np.array([r["t_end_s"] for r in rows]) / 60.0
    s = np.array([r["success"] for r in rows], float)
    roll = np.array([s[max(0, i - window + 1): i + 1].mean() for i in range(len(s))])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, roll, label=f"success, last {window} episodes")
    ax.scatter(t, s, s=6, alpha=0.3, label="episode success")
    if heldout:
        ax.plot([h["minute"] for h in heldout], [h["success_rate"] for h in heldout], "o-", color="C3",
                label=f"held-out, deterministic ({heldout[0]['episodes']} episodes)")
    if stage2:  # the checkpoint the policy reloaded after stop -> Stage 2, at the end of the online phase
        ax.plot([t[-1] if len(t) else 0.0], [stage2["success_rate"]], "*", ms=14, color="C2",
                label="held-out after Stage 2 (deterministic)")
    ax2 = ax.twinx()
    ax2.step(t, [r["head_version"] for r in rows], where="post", color="gray", alpha=0.6, label="head version")
    ax.set_xlabel("wall clock (min)")
    ax.set_ylabel("success")
    ax2.set_ylabel("head version")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="upper left")
    ax.set_title(f"online SACfD through ROS 2, sim ({task})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "metaworld_tiny", help="Stage 0 checkpoint")
    ap.add_argument("--task", default=TASK)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall clock of online RL (policy episodes)")
    ap.add_argument("--demos", type=int, default=20, help="scripted-expert demonstrations recorded first")
    ap.add_argument("--max-steps", type=int, default=100, help="policy steps per episode (reward_node limit)")
    ap.add_argument("--window", type=int, default=20, help="first/last N episodes compared")
    ap.add_argument("--rate", type=float, default=10.0, help="control rate (Hz) of sim and policy")
    ap.add_argument("--seed", type=int, default=1000, help="first sim seed (each episode the next)")
    ap.add_argument("--snapshot-every-s", type=float, default=30.0)
    ap.add_argument("--snapshot-every-episodes", type=int, default=2)
    ap.add_argument("--learner-set", action="append", default=[], metavar="KEY=VALUE",
                    help="learner config override, e.g. sac.utd=2 (repeatable)")
    ap.add_argument("--stage2", action="store_true", help="after stopping: offline iteration + reload (timed)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="offline iteration (--stage2) config override, e.g. sac.offline_updates=500 (repeatable)")
    ap.add_argument("--heldout-every-min", type=float, default=5.0,
                    help="copy the running head this often for the held-out evaluation (0: none)")
    ap.add_argument("--heldout-episodes", type=int, default=40, help="held-out episodes per copied head")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml",
                    help="env settings of the held-out evaluation (as bench_stage1_sparse.py)")
    ap.add_argument("--work", type=Path, help="working directory (default: a temp dir, removed)")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "77")))
    ap.add_argument("--name", default="online_rl_sim")
    args = ap.parse_args(argv)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from std_srvs.srv import SetBool, Trigger

    from ire_vla_ros.episodes.store import read_episode_info

    tmp = None if args.work else tempfile.mkdtemp(prefix="bench_online_rl_")
    work = Path(args.work or tmp)
    result = {"bench": "online_rl_sim", "task": args.task, "args": {k: str(v) for k, v in vars(args).items()},
              "machine": machine()}
    ckpt0 = copy_checkpoint(args.checkpoint, work / "checkpoints")
    rig = Rig(args.domain, work, args)
    try:
        # 1) demonstrations: the scripted expert drives, teleop episodes
        t0 = time.monotonic()
        assert rig.call(SetBool, "/teleop_node/enable", SetBool.Request(data=True)).success
        demos = [rig.episode() for _ in range(args.demos)]
        assert rig.call(SetBool, "/teleop_node/enable", SetBool.Request(data=False)).success
        result["demos"] = {"n": len(demos), "successes": sum(read_episode_info(p).success for p in demos),
                           "seconds": round(time.monotonic() - t0, 1)}
        # 2) online RL: the policy drives, its episodes feed the learner
        for node in (rig.recorder, rig.reward):
            rig.set(node, action_topic="/policy_node/action")
        rig.set(rig.recorder, source="policy")
        r = rig.call(Trigger, "/trainer_node/start_online_rl")
        if not r.success:
            raise RuntimeError(r.message)
        wait_for(lambda: rig.trainer_status().get("online", {}).get("state") in ("ready", "failed"), 1800, "learner ready")
        online = rig.trainer_status()["online"]
        if online["state"] != "ready":
            raise RuntimeError(f"learner: {online.get('error')}")
        result["learner_ready"] = online.get("ready")
        assert rig.call(SetBool, "/policy_node/enable", SetBool.Request(data=True)).success
        t_online = time.monotonic()
        commands0 = rig.policy.stats()["commands_sent"]
        rows, heads = [], []  # heads: (minute, version, copied snapshot path) for the held-out evaluation
        heads_dir, kept = work / "checkpoints" / "heads", work / "heldout_heads"
        while time.monotonic() - t_online < args.minutes * 60 or len(rows) < 2 * args.window and \
                time.monotonic() - t_online < args.minutes * 60 * 2:
            version = rig.policy.online.swapper.version
            path = rig.episode()
            info = read_episode_info(path)
            rows.append({"episode": len(rows), "success": bool(info.success), "steps": info.n_steps,
                         "head_version": version, "t_end_s": round(time.monotonic() - t_online, 1)})
            print(f"episode {len(rows)}: success {info.success} steps {info.n_steps} head v{version} "
                  f"t {rows[-1]['t_end_s']} s", flush=True)
            minute = rows[-1]["t_end_s"] / 60.0
            if args.heldout_every_min > 0 and minute >= args.heldout_every_min * (len(heads) + 1):
                heads.append(copy_running_head(heads_dir, kept, minute, version))
        online_s = time.monotonic() - t_online
        commands = rig.policy.stats()["commands_sent"] - commands0
        assert rig.call(SetBool, "/policy_node/enable", SetBool.Request(data=False)).success
        st = rig.trainer_status()["online"]
        # 3) stop (and optionally Stage 2 -> reload)
        t0 = time.monotonic()
        rig.call(Trigger, "/trainer_node/stop_online_rl")
        wait_for(lambda: rig.trainer_status().get("online", {}).get("state") in ("stopped", "failed"), 600, "learner stop")
        result["stop_s"] = round(time.monotonic() - t0, 1)
        if args.stage2:
            wait_for(lambda: rig.trainer_status().get("state") in ("succeeded", "failed", "cancelled")
                     and rig.trainer_status().get("reload") not in ("", "pending"), 3600, "offline iteration + reload")
            s = rig.trainer_status()
            result["stage2"] = {"state": s["state"], "reload": s["reload"], "checkpoint": s["checkpoint"],
                                "seconds": round(time.monotonic() - t0, 1)}
        w = args.window
        first, last = [r["success"] for r in rows[:w]], [r["success"] for r in rows[-w:]]
        result.update({
            "episodes": len(rows), "online_seconds": round(online_s, 1),
            "success_first": rate(first), "success_last": rate(last), "window": w,
            "overlap": max(0, 2 * w - len(rows)),  # episodes counted in both windows (a short run)
            "gain_points": None if not rows else round(100 * (rate(last) - rate(first)), 1),
            # the learner's lag at the end of the online phase: episodes saved but not yet trained on
            "learner_lag_episodes": len(rows) - int(st.get("episodes") or 0),
            "heads_swapped": rig.policy.online.swapper.counters["head_swaps"],
            "head_versions_used": sorted({r["head_version"] for r in rows}),
            "learner": {k: st.get(k) for k in ("episodes", "rejected", "dropped_queue_full", "snapshots", "version",
                                               "success_rate_last_20", "last_snapshot")},
            "policy": {**{k: rig.policy.stats().get(k) for k in ("commands_sent", "inference_ms_mean", "stale_skips")},
                       "commands_per_s_online": round(commands / online_s, 2),
                       **{k: v for k, v in rig.policy.online.stats().items() if k.startswith("head_")}},
            "loadavg_at_end": os.getloadavg()[0], "rows": rows, "checkpoint": str(ckpt0),
        })
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(RESULTS / f"{args.name}.png", rows, w, args.task)
        result["png"] = str(RESULTS / f"{args.name}.png")
        write_result(args.name, result)
    finally:
        rig.close()
    try:
        if heads:
            result["heldout"] = evaluate_heads(ckpt0, [h for h in heads if h is not None], args)
            print("held-out (deterministic):", [(h["minute"], h["success_rate"]) for h in result["heldout"]], flush=True)
        stage2 = result.get("stage2") or {}
        if stage2.get("state") == "succeeded" and stage2.get("checkpoint"):
            stage2["heldout"] = evaluate_heads(Path(stage2["checkpoint"]), [], args)[0]
            print("held-out after Stage 2 (deterministic):", stage2["heldout"]["success_rate"], flush=True)
        if heads or "heldout" in stage2:
            plot(RESULTS / f"{args.name}.png", rows, args.window, args.task, result.get("heldout"),
                 stage2.get("heldout"))
            write_result(args.name, result)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def copy_running_head(heads_dir: Path, kept: Path, minute: float, version: int) -> dict | None:
    """Copies the snapshot the policy runs now (version 0: the checkpoint's own head, nothing to copy)."""
    if version <= 0:
        return {"minute": round(minute, 2), "version": 0, "path": None}
    src = heads_dir / f"head-{version:06d}.safetensors"
    if not src.is_file():  # the learner keeps its last few; the running one is among them
        print(f"held-out copy skipped: {src} is gone", flush=True)
        return None
    kept.mkdir(parents=True, exist_ok=True)
    dst = kept / src.name
    shutil.copy2(src, dst)
    return {"minute": round(minute, 2), "version": version, "path": str(dst)}


def evaluate_heads(ckpt0: Path, heads: list[dict], args) -> list[dict]:
    """The checkpoint `ckpt0` and it with each copied head, deterministic actions, the same held-out
    seeds for all."""
    import torch

    from ire_vla_ros.sim.metaworld_env import heldout_seeds
    from ire_vla_ros.training.config import load_iterate_config
    from ire_vla_ros.training.rollout import evaluate, make_envs
    from ire_vla_ros.vla.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    cfg = load_iterate_config(args.config, {})
    envs, seeds = make_envs([args.task], 8, cfg.env), heldout_seeds(args.heldout_episodes)
    out = []
    for h in [{"minute": 0.0, "version": 0, "path": None}] + heads:
        policy = load_checkpoint(ckpt0)
        if h["path"]:
            policy.load_head_snapshot(h["path"])
        t = time.perf_counter()
        r = evaluate(policy, envs, seeds)[args.task]
        out.append({"minute": h["minute"], "version": h["version"], "success_rate": r["success_rate"],
                    "successes": r["successes"], "episodes": r["episodes"], "seconds": round(time.perf_counter() - t, 1),
                    # the exploration noise the policy ran with (pre-squash log-std, mean over dims)
                    "log_std": round(float(policy.actor.log_std.mean()), 3)})
    for env in envs:
        env.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
