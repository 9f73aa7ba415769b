"""The online SACfD learner: a child process of the trainer node (no ROS in here).

    python -m ire_vla_ros.training.online_learner --checkpoint CK --episodes DIR --out HEADS_DIR

- stdin: one JSON line per finalized episode, `{"path": "<file under --episodes>"}` (a bare JSON
  string works too), written by whoever finalizes episodes (the trainer node, fed by the
  recorder): the learner blocks on its input, it never polls the disk. EOF (or SIGTERM/SIGINT)
  ends the run after a last snapshot.
- Each new episode's frames go through the frozen backbone once; the transitions join the
  online buffer (bounded in bytes); the teleop episodes under --episodes (or --demos) fill the
  demo buffer at start. Training runs at `sac.utd` critic updates per new transition.
- Every --snapshot-every-s seconds or --snapshot-every-episodes episodes (whichever comes first,
  once the actor has moved) it writes `HEADS_DIR/head-<version>.safetensors` (actor head +
  normalization, `VLAPolicy.save_head_snapshot`: temp, fsync, rename) and then the one-line
  pointer `HEADS_DIR/latest_head` the same way. Versions only increase, across restarts too.
  It keeps the newest --keep snapshots. The policy node loads one with
  `VLAPolicy.load_head_snapshot(latest_head_snapshot(HEADS_DIR))`, between episodes.
- stdout: one JSON line per event ({"event": "ready" | "episode" | "rejected" | "snapshot" |
  "dropped" | "done", ...}); logs go to stderr.
- Bounded: the input queue (--max-queue; a full queue drops the newest path and counts it: the
  episode stays on disk for offline training) and both replay buffers (bytes). A crash loses no
  episode: episodes are files, the learner only reads them; restart with --replay-existing to
  re-read the policy episodes already on disk.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("ire_vla_ros.online_learner")

LATEST_HEAD = "latest_head"
_SNAPSHOT = re.compile(r"^head-(\d{6,})\.safetensors$")


def latest_head_snapshot(heads_dir: str | Path) -> Path | None:
    """The snapshot `heads_dir/latest_head` names (None before the first one), confined to heads_dir."""
    from ..paths import confine

    pointer = Path(heads_dir) / LATEST_HEAD
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _SNAPSHOT.match(name):
        raise ValueError(f"{pointer} names {name!r}, not a head snapshot file")
    return confine(heads_dir, name)


def snapshot_version(path: str | Path) -> int:
    m = _SNAPSHOT.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a head snapshot file name")
    return int(m.group(1))


def _write_pointer(heads_dir: Path, name: str) -> None:
    tmp = heads_dir / f".{LATEST_HEAD}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, heads_dir / LATEST_HEAD)
    fd = os.open(heads_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str), flush=True)


def parse_episode_line(line: str) -> str:
    """'{"path": "a.h5"}' or '"a.h5"' -> 'a.h5'; ValueError otherwise."""
    obj = json.loads(line)
    if isinstance(obj, dict):
        obj = obj.get("path")
    if not isinstance(obj, str) or not obj:
        raise ValueError("expected {\"path\": \"<episode file>\"} or a JSON string")
    return obj


class StdinReader(threading.Thread):
    """Reads JSON lines from a stream into a bounded queue; None marks the end of input."""

    def __init__(self, stream, q: queue.Queue):
        super().__init__(daemon=True, name="episode-reader")
        self.stream, self.q = stream, q
        self.dropped = 0

    def run(self) -> None:
        for line in self.stream:
            line = line.strip()
            if not line:
                continue
            try:
                self.q.put_nowait(line)
            except queue.Full:
                self.dropped += 1
                emit("dropped", line=line[:200], dropped=self.dropped, reason="input queue full")
        self.q.put(None)  # blocking: the end marker must arrive


class OnlineLearner:
    """Holds the policy, the SAC learner and both buffers; feeds episodes in, writes snapshots."""

    def __init__(self, checkpoint: Path, episodes_root: Path, heads_dir: Path, cfg, *, demos_root: Path | None = None,
                 keep: int = 5, device: str = "cpu", intervention_bytes: int = 256 << 20):
        from ..episodes.store import scan_episodes
        from ..vla.checkpoint import load_checkpoint
        from .sac import LatentReplay, bytes_per_transition
        from .stages import begin_stage1_sac

        self.cfg, self.episodes_root, self.heads_dir, self.keep = cfg, Path(episodes_root), Path(heads_dir), keep
        self.heads_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = Path(checkpoint)
        self.policy = load_checkpoint(checkpoint, device=device)
        demos = scan_episodes(demos_root or self.episodes_root, sources=["teleop"]).episodes
        if not demos:
            raise ValueError(f"no teleop episodes under {demos_root or self.episodes_root}: record demonstrations first")
        self.learner, self.demo, stats = begin_stage1_sac(self.policy, demos, cfg)
        self.tag = stats["latent_tag"]
        self.online = LatentReplay(cfg.buffer_bytes, self.demo.tokens, self.demo.width, self.demo.state.shape[1],
                                   self.demo.action.shape[1], self.tag)
        # HIL-SERL: the operator's intervention steps go into both buffers; they join the demo half
        # of the batches through their own bounded buffer (the demo buffer is sized to the demos)
        self.interventions = LatentReplay(intervention_bytes, self.demo.tokens, self.demo.width,
                                          self.demo.state.shape[1], self.demo.action.shape[1], self.tag)
        assert self.online.bytes_per_transition == bytes_per_transition(
            self.demo.tokens, self.demo.width, self.demo.state.shape[1], self.demo.action.shape[1])
        self.version = max((snapshot_version(p) for p in self.heads_dir.glob("head-*.safetensors")
                            if _SNAPSHOT.match(p.name)), default=0)
        self.seen: set[Path] = set()
        self.episodes = self.rejected = 0
        self.budget = 0.0
        self.actor_updates_at_snapshot = self.learner.actor_updates
        self.episodes_at_snapshot = 0
        self.last_snapshot = time.monotonic()
        self.start_stats = {"demo_transitions": len(self.demo), "bytes_per_transition": self.online.bytes_per_transition,
                            "online_capacity": self.online.capacity, "latent_tag": self.tag, "version": self.version}

    def add_episode(self, raw_path: str) -> bool:
        """Validates, encodes and stores one finalized episode. False (and a 'rejected' event) if unusable."""
        from ..episodes.store import EpisodeError, read_episode
        from ..paths import PathOutsideRoot, confine
        from .sac import add_episode

        try:
            path = confine(self.episodes_root, raw_path)
            if path in self.seen:
                raise ValueError("already consumed")
            ep = read_episode(path)
            if ep.source not in ("policy", "rl"):
                raise ValueError(f"source {ep.source!r}: the online buffer takes policy episodes only")
            if list(ep.joint_names) != self.policy.joint_names or ep.action_spec.dim != self.policy.action_spec.dim:
                raise ValueError("joint names / action dimension differ from the checkpoint's")
            n = add_episode(self.online, self.policy, ep, self.cfg, self.tag)
            interventions = self._copy_interventions(ep, n)
        except (PathOutsideRoot, EpisodeError, OSError, ValueError, KeyError) as e:
            self.rejected += 1
            emit("rejected", path=raw_path, reason=f"{type(e).__name__}: {e}", rejected=self.rejected)
            return False
        self.seen.add(path)
        self.episodes += 1
        self.budget += self.cfg.utd * n
        emit("episode", path=str(path), transitions=n, success=bool(ep.success), episodes=self.episodes,
             online_transitions=len(self.online), interventions=interventions,
             intervention_transitions=len(self.interventions))
        return True

    def _copy_interventions(self, ep, n: int) -> int:
        """The episode's intervention steps (step_info/intervention), just added to the online
        buffer as its newest n rows, copied into the intervention buffer. Returns how many."""
        import numpy as np
        import torch

        flags = ep.step_info.get("intervention") if ep.step_info else None
        if flags is None or n <= 0 or n > self.online.capacity:
            return 0
        sel = np.nonzero(np.asarray(flags[:n]) > 0.5)[0]
        if len(sel) == 0:
            return 0
        o = self.online
        idx = torch.as_tensor((o.pos - n + sel) % o.capacity)
        for s in range(0, len(idx), self.interventions.capacity):
            part = idx[s:s + self.interventions.capacity]
            self.interventions.add(**{k: getattr(o, k)[part] for k in (
                "hidden", "mask", "state", "action", "reward", "done", "next_hidden", "next_mask", "next_state",
                "behaviour_action", "mc_return", "success")}, tag=self.tag)
        return int(len(sel))

    def train_some(self, max_updates: int = 50) -> int:
        """Up to max_updates critic updates from the UTD budget; returns how many ran. The demo half of
        a batch comes from the demos or the interventions, in proportion to their sizes."""
        k = min(int(self.budget), max_updates)
        if k <= 0 or len(self.online) == 0:
            return 0
        n_int = len(self.interventions)
        k_int = int(round(k * n_int / (n_int + len(self.demo)))) if n_int else 0
        if k - k_int:
            self.last_train = self.learner.train(self.online, self.demo, k - k_int)
        if k_int:
            self.last_train = self.learner.train(self.online, self.interventions, k_int)
        self.budget -= k
        return k

    def snapshot_due(self, every_s: float, every_episodes: int) -> bool:
        if self.learner.actor_updates == self.actor_updates_at_snapshot:
            return False  # nothing new to publish
        return (time.monotonic() - self.last_snapshot >= every_s
                or self.episodes - self.episodes_at_snapshot >= every_episodes)

    def write_snapshot(self) -> Path:
        self.version += 1
        name = f"head-{self.version:06d}.safetensors"
        meta = {"version": self.version, "checkpoint": str(self.checkpoint), "episodes": self.episodes,
                "critic_updates": self.learner.critic_updates, "actor_updates": self.learner.actor_updates,
                "latent_tag": self.tag}
        with self.learner.published_actor():
            path = self.policy.save_head_snapshot(self.heads_dir / name, metadata=meta)
        _write_pointer(self.heads_dir, name)
        for old in sorted(self.heads_dir.glob("head-*.safetensors"), key=snapshot_version)[: -self.keep]:
            old.unlink(missing_ok=True)
        self.actor_updates_at_snapshot = self.learner.actor_updates
        self.episodes_at_snapshot = self.episodes
        self.last_snapshot = time.monotonic()
        stats = getattr(self, "last_train", {})
        emit("snapshot", path=str(path), **meta, online_transitions=len(self.online),
             q_mean=stats.get("q_mean"), alpha=stats.get("alpha"), log_std=stats.get("log_std"))
        return path


def run(args) -> int:
    import torch

    from ..episodes.store import scan_episodes
    from ..vla.checkpoint import CheckpointError, resolve_device
    from .config import load_iterate_config, parse_override

    torch.set_num_threads(args.threads)
    cfg = load_iterate_config(args.config, dict(parse_override(s) for s in args.set)).sac
    try:
        learner = OnlineLearner(args.checkpoint, args.episodes, args.out, cfg, demos_root=args.demos,
                                keep=args.keep, device=resolve_device(args.device),
                                intervention_bytes=args.intervention_bytes)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit("ready", **learner.start_stats)
    if args.replay_existing:
        for p in scan_episodes(args.episodes, sources=["policy", "rl"]).episodes:
            learner.add_episode(str(p))
    q: queue.Queue = queue.Queue(maxsize=args.max_queue)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # finish the current step, write a last snapshot, exit
        stop.set()
        try:
            q.put_nowait(None)  # wakes the blocked get
        except queue.Full:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    reader = StdinReader(sys.stdin, q)
    reader.start()
    ended = False
    while not stop.is_set():
        # Training work first; when there is none, block on the input (no polling), waking up in
        # time for a due snapshot.
        timeout = None if learner.budget < 1 else 0.0
        if timeout is None:
            timeout = max(0.05, args.snapshot_every_s - (time.monotonic() - learner.last_snapshot))
        try:
            item = q.get(timeout=timeout) if not ended else None
        except queue.Empty:
            item = ""
        if item is None:
            ended = True
        elif item:
            try:
                learner.add_episode(parse_episode_line(item))
            except (ValueError, json.JSONDecodeError) as e:
                learner.rejected += 1
                emit("rejected", line=item[:200], reason=str(e), rejected=learner.rejected)
        learner.train_some()
        if learner.snapshot_due(args.snapshot_every_s, args.snapshot_every_episodes):
            learner.write_snapshot()
        if ended and learner.budget < 1:
            break
    if learner.learner.actor_updates != learner.actor_updates_at_snapshot:
        learner.write_snapshot()
    emit("done", episodes=learner.episodes, rejected=learner.rejected, dropped=reader.dropped,
         version=learner.version, critic_updates=learner.learner.critic_updates)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ire_vla_ros.training.online_learner",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..paths import config_path

    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint (or root with `latest`) to improve")
    ap.add_argument("--episodes", type=Path, required=True, help="episode store root; every input path must lie inside")
    ap.add_argument("--out", type=Path, required=True, help="directory for head snapshots and `latest_head`")
    ap.add_argument("--demos", type=Path, help="teleop episode root for the demo buffer (default: --episodes)")
    ap.add_argument("--config", type=Path, default=config_path("trainer.yaml"), help="YAML with a `sac:` section")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sac.utd=2")
    ap.add_argument("--snapshot-every-s", type=float, default=30.0)
    ap.add_argument("--snapshot-every-episodes", type=int, default=5)
    ap.add_argument("--keep", type=int, default=5, help="snapshots kept on disk")
    ap.add_argument("--max-queue", type=int, default=256, help="episode paths waiting to be read")
    ap.add_argument("--intervention-bytes", type=int, default=256 << 20,
                    help="buffer for the operator's intervention steps (they join the demo half of the batches)")
    ap.add_argument("--replay-existing", action="store_true", help="first add the policy episodes already on disk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
