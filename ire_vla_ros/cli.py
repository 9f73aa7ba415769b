"""`ire-vla`: the command line of ire_vla_ros (no ROS needed except for `bringup`).

  ire-vla collect        record scripted-expert demonstrations in Metaworld (tagged teleop)
  ire-vla train sft      Stage 0/2 SFT on recorded episodes
  ire-vla train rl       Stage 1 (SACfD or PPO) in Metaworld with the VLM frozen
  ire-vla train offline  the next iRe-VLA stage(s) on episodes recorded on the robot (trainer node)
  ire-vla iterate        Stage 0, then (Stage 1, Stage 2) x K in Metaworld, with evaluation
  ire-vla demo           `iterate` with config/demo.yaml, then a results table
  ire-vla eval           success rate of a checkpoint on held-out seeds
  ire-vla episodes       list / show / validate an episode store; import-bag, export, import
  ire-vla bringup        start the ROS 2 nodes in one process (sim or robot)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .paths import config_path

log = logging.getLogger("ire_vla")


def _config_args(p: argparse.ArgumentParser, default: str | None = "iterate.yaml") -> None:
    p.add_argument("--config", type=Path, default=config_path(default) if default else None,
                   help="YAML with the hyperparameters (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set ppo.lr_actor=3e-4 (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write TensorBoard scalars (losses, entropy, value, lr, eval success) under DIR/<run>")


def _load_cfg(args):
    from .training.config import load_iterate_config, parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.device:
        overrides["device"] = args.device
    return load_iterate_config(args.config, overrides)


# ----------------------------------------------------------------------------- commands
def cmd_collect(args) -> int:
    from .sim.collect import CollectError, collect_expert_episodes

    cfg = _load_cfg(args)
    tasks = args.tasks or cfg.tasks
    for task in tasks:
        try:
            paths = collect_expert_episodes(task, args.episodes or cfg.collect.episodes_per_task, args.out / task,
                                            seed0=args.seed0, noise_std=cfg.collect.noise_std if args.noise is None else args.noise,
                                            image_size=cfg.env.image_size, camera=cfg.env.camera,
                                            max_episode_steps=cfg.env.max_episode_steps, action_repeat=cfg.env.action_repeat,
                                            progress=not args.no_progress, min_free_mb=args.min_free_mb)
        except CollectError as exc:  # disk full / I/O error: finished episodes are kept
            print(f"ire-vla collect: {exc}", file=sys.stderr)
            return 2
        print(f"{task}: {len(paths)} episodes in {args.out / task}")
    return 0


def cmd_train_sft(args) -> int:
    from .episodes.store import scan_episodes
    from .training.stages import new_policy, stage0_sft, stage2_sft
    from .vla.checkpoint import load_checkpoint, read_metadata, resolve_device, save_checkpoint

    from .training import distributed

    cfg = _load_cfg(args)
    # Under torchrun (WORLD_SIZE > 1) join the process group: DDP over LoRA + head, rank 0 saves.
    dist_info = distributed.init_from_env(resolve_device(cfg.device))
    device = distributed.device_for(resolve_device(cfg.device))
    expert = scan_episodes(args.episodes, sources=["teleop"]).episodes
    online = scan_episodes(args.episodes, sources=["policy", "rl"], successful_only=True).episodes
    if not expert:
        print(f"no teleop episodes under {args.episodes}", file=sys.stderr)
        return 2
    if args.init:
        policy = load_checkpoint(args.init, device=device)
        stats = stage2_sft(policy, expert, online, cfg.stage2_sft or cfg.sft, progress=not args.no_progress)
        stage, iteration = "sft", int(read_metadata(args.init).get("iteration", 0))
    else:
        from .episodes.store import read_episode

        ep = read_episode(expert[0], load_images=False)
        policy = new_policy(cfg, ep.action_spec, ep.joint_names, device)
        stats = stage0_sft(policy, expert, cfg.sft, progress=not args.no_progress)
        stage, iteration = "sft", 0
    if dist_info.is_main:  # one writer: rank 0, atomically (a failed run leaves `latest` as it was)
        ckpt = save_checkpoint(policy, args.checkpoints, stage=stage, iteration=iteration,
                               metadata={"train": stats, "expert": [str(p) for p in expert],
                                         "online": [str(p) for p in online]})
        print(f"CHECKPOINT {ckpt}")
    distributed.barrier()
    distributed.shutdown()
    return 0


def cmd_train_rl(args) -> int:
    from .training.rollout import make_envs
    from .training.stages import stage1_ppo_sim
    from .vla.checkpoint import load_checkpoint, read_metadata, resolve_device, save_checkpoint

    cfg = _load_cfg(args)
    algo = args.algo or cfg.stage1.algo
    demos = []
    if algo == "sac":
        from .episodes.store import scan_episodes

        if args.demos is None:
            print("ire-vla train rl: --algo sac needs --demos DIR (teleop episodes for the demo buffer; "
                  "`ire-vla collect` writes them)", file=sys.stderr)
            return 2
        demos = scan_episodes(args.demos, sources=["teleop"]).episodes
        if not demos:
            print(f"ire-vla train rl: no teleop episodes under {args.demos}", file=sys.stderr)
            return 2
    policy = load_checkpoint(args.init, device=resolve_device(cfg.device))
    iteration = int(read_metadata(args.init).get("iteration", 0)) + 1
    tasks = args.tasks or cfg.tasks
    envs = make_envs(tasks, max(1, (cfg.sac if algo == "sac" else cfg.ppo).num_envs // len(tasks)), cfg.env)
    try:
        if algo == "sac":
            from .training.stages import stage1_sac_sim

            stats = stage1_sac_sim(policy, envs, demos, cfg.sac, episode_root=args.episodes, iteration=iteration,
                                   progress=not args.no_progress)
        else:
            stats = stage1_ppo_sim(policy, envs, cfg.ppo, episode_root=args.episodes, iteration=iteration,
                                   progress=not args.no_progress)
    finally:
        for e in envs:
            e.close()
    ckpt = save_checkpoint(policy, args.checkpoints, stage="rl", iteration=iteration, metadata={"train": stats})
    print(f"CHECKPOINT {ckpt}")
    return 0


def cmd_train_offline(args) -> int:
    from .training.offline import run_offline_iteration

    cfg = _load_cfg(args)

    def report(stage: str, fraction: float, message: str) -> None:
        print("PROGRESS " + json.dumps({"stage": stage, "fraction": round(fraction, 3), "message": message}), flush=True)

    import shlex

    ckpt = run_offline_iteration(cfg, args.episodes, args.checkpoints, init=args.init, report=report,
                                 progress=not args.no_progress, sft_processes=args.sft_processes,
                                 sft_launcher_args=shlex.split(args.sft_launcher_args or ""))
    print(f"CHECKPOINT {ckpt}", flush=True)
    return 0


def cmd_iterate(args) -> int:
    from .training.iterate import IterationRunner, success_table

    cfg = _load_cfg(args)
    t = time.time()
    results = IterationRunner(cfg, args.out, progress=not args.no_progress).run()
    print()
    print(success_table(results))
    print(f"\nresults: {args.out / 'results.json'}   plot: {args.out / 'success_rate.png'}   "
          f"videos: {args.out / 'videos'}   ({time.time() - t:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .sim.metaworld_env import heldout_seeds
    from .training.rollout import evaluate, make_envs
    from .vla.checkpoint import load_checkpoint, resolve_device

    cfg = _load_cfg(args)
    policy = load_checkpoint(args.checkpoint, device=resolve_device(cfg.device))
    envs = make_envs(args.tasks or cfg.tasks, 2, cfg.env)
    try:
        res = evaluate(policy, envs, heldout_seeds(args.episodes), deterministic=not args.stochastic,
                       video_path=args.video)
    finally:
        for e in envs:
            e.close()
    from .training import tb

    tb.log_eval(res, step=0)  # no-op without --tensorboard
    print(json.dumps(res, indent=2))
    return 0


def cmd_episodes(args) -> int:
    from .episodes import inspect as ep_inspect

    if args.action == "list":
        print(ep_inspect.list_table(args.path))
        return 0
    if args.action == "show":
        print(ep_inspect.show(args.path))
        return 0
    text, n_bad = ep_inspect.validate(args.path)
    print(text)
    return 1 if n_bad else 0


def cmd_bringup(args) -> int:
    from .nodes import bringup

    return bringup.run(args)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ire-vla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="record scripted-expert demos in Metaworld")
    _config_args(p)
    p.add_argument("--out", type=Path, required=True, help="episode store root")
    p.add_argument("--tasks", nargs="+", help="Metaworld v3 tasks (default: config's)")
    p.add_argument("--episodes", type=int, help="episodes per task (default: config's)")
    p.add_argument("--noise", type=float, help="Gaussian action noise std (default: config's)")
    p.add_argument("--seed0", type=int, default=0, help="first placement seed")
    p.add_argument("--min-free-mb", type=float, default=50.0,
                   help="stop with an error (finished episodes kept) below this much free disk (default 50)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="run one training stage")
    tsub = p.add_subparsers(dest="stage", required=True)
    q = tsub.add_parser("sft", help="Stage 0 (no --init) or Stage 2 (--init CKPT) SFT on recorded episodes")
    _config_args(q)
    q.add_argument("--episodes", type=Path, required=True, help="episode store root")
    q.add_argument("--checkpoints", type=Path, required=True, help="checkpoint root (gets a `latest` pointer)")
    q.add_argument("--init", type=Path, help="start from this checkpoint (Stage 2)")
    q.set_defaults(func=cmd_train_sft)
    q = tsub.add_parser("rl", help="Stage 1 (SACfD or PPO) in Metaworld with the VLM frozen")
    _config_args(q)
    q.add_argument("--algo", choices=["sac", "ppo"], help="Stage 1 algorithm (default: the config's stage1.algo)")
    q.add_argument("--demos", type=Path, help="teleop episode root for SACfD's demo buffer (required with sac)")
    q.add_argument("--init", type=Path, required=True, help="checkpoint to improve")
    q.add_argument("--checkpoints", type=Path, required=True, help="checkpoint root")
    q.add_argument("--episodes", type=Path, help="where successful RL episodes are kept")
    q.add_argument("--tasks", nargs="+", help="Metaworld v3 tasks (default: config's)")
    q.set_defaults(func=cmd_train_rl)
    q = tsub.add_parser("offline", help="next iRe-VLA stage(s) on robot-recorded episodes (used by trainer_node)")
    _config_args(q, default="trainer.yaml")
    q.add_argument("--episodes", type=Path, required=True, help="episode store root (teleop + policy episodes)")
    q.add_argument("--checkpoints", type=Path, required=True, help="checkpoint root")
    q.add_argument("--init", type=Path, help="starting checkpoint when the root has none yet")
    q.add_argument("--sft-processes", type=int, default=1,
                   help="run Stage 0/2 SFT under torchrun with this many processes (DDP; default 1: in process)")
    q.add_argument("--sft-launcher-args", default="",
                   help="extra torchrun arguments for multi-node SFT, e.g. "
                        "'--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400'")
    q.set_defaults(func=cmd_train_offline)

    p = sub.add_parser("iterate", help="Stage 0 + K x (Stage 1, Stage 2) in Metaworld with evaluation")
    _config_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/iterate"), help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("demo", help="the README's demo: iterate with config/demo.yaml")
    _config_args(p, default="demo.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("eval", help="success rate of a checkpoint on held-out seeds")
    _config_args(p)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or root with `latest`")
    p.add_argument("--tasks", nargs="+", help="Metaworld v3 tasks (default: config's)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (default: %(default)s)")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the mean")
    p.add_argument("--video", type=Path, help="write an MP4 of the first episode per task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("episodes", help="inspect an episode store")
    esub = p.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "one line per episode"), ("show", "one episode in detail"),
                           ("validate", "report corrupted/incomplete files; exit 1 if any")):
        q = esub.add_parser(name, help=helptext)
        q.add_argument("path", type=Path, help="episode file" if name == "show" else "episode store root")
        q.set_defaults(func=cmd_episodes)
    q = esub.add_parser("import-bag", help="rosbag2 recordings (MCAP/sqlite3) -> teleop episodes")
    from .episodes import bag_import

    bag_import.add_arguments(q)
    q.set_defaults(func=bag_import.run)
    from .episodes import interop_cli

    q = esub.add_parser("export", help="episodes -> MCAP files (Foxglove, PlotJuggler) or a LeRobotDataset v3.0")
    interop_cli.add_export_arguments(q)
    q.set_defaults(func=interop_cli.run_export)
    q = esub.add_parser("import", help="a LeRobotDataset v3.0 -> episodes")
    interop_cli.add_import_arguments(q)
    q.set_defaults(func=interop_cli.run_import)

    p = sub.add_parser("bringup", help="start the ROS 2 nodes in one process (manual composition)")
    try:
        from .nodes import bringup

        bringup.add_arguments(p)
    except ImportError as e:  # rclpy missing: say so when the command is used
        p.set_defaults(bringup_error=str(e))
    p.set_defaults(func=cmd_bringup)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)  # "No OpenGL_accelerate module" on every run
    if getattr(args, "bringup_error", None):
        print(f"ire-vla bringup needs ROS 2 (rclpy): {args.bringup_error}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "tensorboard", None):
            from .training import tb

            tb.enable(args.tensorboard)
            try:
                return int(args.func(args) or 0)
            finally:
                tb.close()
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - user mistakes become one line; anything else re-raised
        reason = user_error(exc, args)
        if reason is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"ire-vla {args.command}: {reason}" + ("" if args.verbose else "  (-v: traceback)"),
              file=sys.stderr)
        return 2


def user_error(exc: BaseException, args) -> str | None:
    """One line naming the file and the reason for a user's mistake (a corrupt or truncated
    checkpoint, a missing path, a bad config value), or None for a bug (which keeps its traceback)."""
    import yaml

    from .vla.checkpoint import CheckpointError

    config = getattr(args, "config", None)
    if isinstance(exc, CheckpointError):
        return str(exc)  # names the checkpoint file and what is wrong with it
    if isinstance(exc, OSError) and exc.filename:  # missing path, permission, not a directory
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        return f"{config}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}"
    if isinstance(exc, ValueError) and config is not None and str(exc).startswith((str(config), "config", "override")):
        return str(exc)  # load_iterate_config names the file and the key: "<file>.ppo.lr: expected a number"
    return None


if __name__ == "__main__":
    sys.exit(main())
