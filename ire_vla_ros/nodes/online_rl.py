"""Online RL over ROS 2 (issue 7 items 3, 4, 6): the trainer-side learner session and the policy-side
head swap and teleop yield. The logic here is ROS-free (testable without DDS); the two small
`*Hooks` classes at the end attach it to trainer_node and policy_node.

Trainer side (`OnlineRLHooks`, used by trainer_node)
  srv  ~/start_online_rl   std_srvs/Trigger  starts `python -m ire_vla_ros.training.online_learner` as a child
                                             process (paths from the trainer's read-only parameters, never
                                             from the request); refused while an offline run is in progress
  srv  ~/stop_online_rl    std_srvs/Trigger  EOF to the learner (it trains out its budget and writes a last
                                             snapshot), SIGTERM after `online_stop_timeout_s`, SIGKILL later;
                                             then (`online_stage2_on_stop`) the trainer's ~/run_iteration path:
                                             offline iteration (Stage 1 + Stage 2 on expert + successful
                                             episodes) -> checkpoint -> /policy_node/reload
  sub  <online_episode_topic>  std_msgs/String   recorder's ~/episode_saved: each path goes to the learner's
                                             stdin (bounded queue; no disk polling); non-policy sources skipped
  pub  ~/head_snapshot     std_msgs/String   LATCHED, JSON {path, version, checkpoint, ...} of each new head
  ~/status gains an `online` object: state, episodes, success_rate_last_20, version, counters, error.

Why a latched topic plus a file: the snapshot FILE is the data (safetensors, written atomically by the
learner: temp, fsync, rename), so a reader never sees half a head and no tensor crosses DDS; the TOPIC
is only the notice. Latched (transient local, depth 1) so a policy node that starts or restarts late
still gets the newest head at once, and a slow one only ever sees the newest (no queue to drain).

Policy side (`PolicyOnlineHooks`, used by policy_node)
  sub  <head_snapshot_topic>   std_msgs/String  the notice above; the newest one is kept (older pending ones
                                               are replaced, counted)
  sub  <episode_active_topic>  std_msgs/Bool    reward_node's latched ~/episode_active
  sub  <teleop_action_topic>   sensor_msgs/JointState  the operator's actions: the policy sends nothing while
                                               they arrive (and for `teleop_yield_s` after the last one)
A new head is loaded (`VLAPolicy.load_head_snapshot`, no backbone reload) in a worker thread, only while
no episode is active, under the runner's lock, so every action of one episode comes from one head.
A head that fails to load, or was trained from another checkpoint than the one running, is refused
(counted, logged) and the old head keeps running.
"""
from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from rclpy.parameter import Parameter

from ire_vla_ros.nodes.ros_common import P

#: Limits (every queue bounded): episode paths waiting for the learner's stdin, events kept for the
#: node's timer, learner output lines kept for the status, and the success window on ~/status.
MAX_PENDING_PATHS = 256
MAX_EVENTS = 512
TAIL_LINES = 20
SUCCESS_WINDOW = 20
MAX_LINE_CHARS = 8192

TRAINER_PARAMS = {
    "online_checkpoint": P("", "Checkpoint the online learner starts from (empty: checkpoints_dir's latest). "
                           "Must be the one the policy node runs: heads from another are refused there",
                           read_only=True),
    "online_episode_topic": P("/recorder_node/episode_saved", "std_msgs/String paths of saved episodes "
                              "(fed to the learner)", read_only=True),
    "online_explore_service": P("/policy_node/explore", "std_srvs/SetBool set true on start, false on stop "
                                "('' = leave the policy alone)", read_only=True),
    "online_learner_args": P([], "Extra learner arguments, e.g. [--set, sac.utd=2]",
                             type=Parameter.Type.STRING_ARRAY, read_only=True),
    "online_snapshot_every_s": P(30.0, "Learner writes a head snapshot at least this often (once it has "
                                 "moved)", min=1.0, max=3600.0, read_only=True),
    "online_snapshot_every_episodes": P(5, "... or after this many new episodes", min=1, max=10_000,
                                        read_only=True),
    "online_replay_existing": P(False, "Learner first re-reads the policy episodes already on disk (after a "
                                "crash: nothing recorded meanwhile is lost)", read_only=True),
    "online_stop_timeout_s": P(60.0, "After EOF, SIGTERM the learner when it has not exited within this; "
                               "SIGKILL 10 s later", min=0.1, max=3600.0),
    "online_stage2_on_stop": P(True, "~/stop_online_rl then runs ~/run_iteration (Stage 2 -> checkpoint -> "
                               "policy reload)"),
}

POLICY_PARAMS = {
    "head_snapshot_topic": P("/trainer_node/head_snapshot", "Latched std_msgs/String JSON notices of new "
                             "online-RL heads ('' = off)", read_only=True),
    "head_snapshot_dir": P("", "Head snapshots must lie in this directory (empty: <checkpoint root>/heads)",
                           read_only=True),
    "episode_active_topic": P("/reward_node/episode_active", "Latched Bool: new heads are swapped in only "
                              "while it is false (between episodes)", read_only=True),
    "teleop_action_topic": P("/teleop_node/action", "Operator actions: the policy yields (sends nothing) "
                             "while they arrive ('' = never yield)", read_only=True),
    "teleop_yield_s": P(0.5, "The policy stays quiet this long after the operator's last (non-idle) action",
                        min=0.0, max=10.0),
}


# =============================================================================================
# Trainer side, no ROS
# =============================================================================================
def learner_command(python: str, *, checkpoint: str, episodes: str, heads: str, config: str = "",
                    device: str = "cpu", snapshot_every_s: float = 30.0, snapshot_every_episodes: int = 5,
                    max_queue: int = MAX_PENDING_PATHS, replay_existing: bool = False,
                    extra: list[str] | None = None) -> list[str]:
    cmd = [python, "-m", "ire_vla_ros.training.online_learner", "--checkpoint", str(checkpoint),
           "--episodes", str(episodes), "--out", str(heads), "--device", str(device),
           "--snapshot-every-s", f"{snapshot_every_s:g}", "--snapshot-every-episodes", str(int(snapshot_every_episodes)),
           "--max-queue", str(int(max_queue))]
    if config:
        cmd += ["--config", str(config)]
    if replay_existing:
        cmd.append("--replay-existing")
    return cmd + list(extra or [])


def _clip(text: str, n: int = 512) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class LearnerSession:
    """One learner child process. `feed(path)` never blocks (bounded queue -> writer thread -> stdin);
    a reader thread parses its JSON events; `take_events()` hands them to the caller's thread.

    States: running (started, not yet ready), ready (demos encoded, consuming), stopping (EOF sent),
    stopped (exit 0 after a stop), failed (any other exit: crash, refused start, killed)."""

    def __init__(self, command: list[str], *, log_path: Path | None = None, env: dict | None = None,
                 cwd: str | None = None, episodes_root: str | Path | None = None,
                 sources: tuple[str, ...] = ("policy", "rl"), max_pending: int = MAX_PENDING_PATHS):
        self.command = list(command)
        self.log_path = log_path
        self.episodes_root = Path(episodes_root) if episodes_root is not None else None
        self.sources = set(sources)
        self.started = time.monotonic()
        self.state = "running"
        self.error = ""
        self.returncode: int | None = None
        self.stop_requested = False
        self._kill_at: float | None = None
        self._term_at: float | None = None
        self._lock = threading.Lock()
        self._paths: queue.Queue = queue.Queue(maxsize=max_pending)
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        self.counters = collections.Counter(fed=0, sent=0, dropped_queue_full=0, skipped_source=0, skipped_unreadable=0,
                                            episodes=0, rejected=0, dropped_by_learner=0, snapshots=0,
                                            events_lost=0)
        self.successes: collections.deque = collections.deque(maxlen=SUCCESS_WINDOW)
        self.version = 0
        self.last_snapshot: dict = {}
        self.ready_info: dict = {}
        self.version_counter = 0  # bumps on every change (for the node's publish-on-change)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")
            self._log.write(f"$ {' '.join(self.command)}\n")
            self._log.flush()
        else:
            self._log = subprocess.DEVNULL
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env, cwd=cwd, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="online-learner-events", daemon=True)
        self._writer = threading.Thread(target=self._write, name="online-learner-feed", daemon=True)
        self._reader.start()
        self._writer.start()

    # -- input ------------------------------------------------------------------------------
    def feed(self, path: str) -> bool:
        """Queue one saved-episode path for the learner; False (counted) when the queue is full or the
        session is stopping. Never blocks: the episode stays on disk for the offline iteration."""
        with self._lock:
            if self.stop_requested or self.returncode is not None:
                return False
            self.counters["fed"] += 1
        try:
            self._paths.put_nowait(str(path))
            return True
        except queue.Full:
            with self._lock:
                self.counters["dropped_queue_full"] += 1
                self.version_counter += 1
            return False

    def _usable(self, path: str) -> bool:
        """Only policy/rl episodes go to the learner (teleop demos are read at its start)."""
        from ire_vla_ros.episodes.store import read_episode_info

        try:
            source = read_episode_info(path).source
        except Exception as exc:  # noqa: BLE001 - a missing/corrupt file: counted, the learner would reject it too
            with self._lock:
                self.counters["skipped_unreadable"] += 1
                self.tail.append(_clip(f"skipped {path}: {type(exc).__name__}: {exc}"))
            return False
        if source not in self.sources:
            with self._lock:
                self.counters["skipped_source"] += 1
            return False
        return True

    def _write(self) -> None:
        while True:
            path = self._paths.get()
            if path is None:
                break
            if not self._usable(path):
                continue
            try:
                self.proc.stdin.write(json.dumps({"path": path}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                break  # the learner is gone: the reader reports it
            with self._lock:
                self.counters["sent"] += 1
        try:
            self.proc.stdin.close()  # EOF: the learner trains out its budget, snapshots, exits
        except (BrokenPipeError, OSError):
            pass

    # -- output -----------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for line in iter(lambda: self.proc.stdout.readline(MAX_LINE_CHARS), ""):
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                    kind = ev.get("event") if isinstance(ev, dict) else None
                except json.JSONDecodeError:
                    kind = None
                if kind is None:
                    with self._lock:
                        self.tail.append(_clip(line))
                    continue
                self._on_event(ev)
        finally:
            rc = self.proc.wait()
            self._writer_unblock()
            with self._lock:
                self.returncode = rc
                if rc == 0 and self.stop_requested:
                    self.state = "stopped"
                else:
                    self.state = "failed"
                    why = "killed" if rc < 0 else f"exit code {rc}"
                    self.error = _clip(f"learner {why}" + (" before it was asked to stop" if not self.stop_requested
                                                           else "") + f"; last output: {self.log_tail(3)}")
                self.version_counter += 1
                self._push({"event": "exit", "returncode": rc, "state": self.state})
            if self._log is not subprocess.DEVNULL:
                self._log.write(f"# exit code {rc}\n")
                self._log.close()

    def _push(self, ev: dict) -> None:  # caller holds the lock
        if len(self._events) == self._events.maxlen:
            self.counters["events_lost"] += 1
        self._events.append(ev)

    def _on_event(self, ev: dict) -> None:
        kind = ev["event"]
        with self._lock:
            if kind == "ready":
                self.state = "ready" if not self.stop_requested else self.state
                self.ready_info = {k: ev.get(k) for k in ("demo_transitions", "online_capacity", "bytes_per_transition",
                                                          "version")}
                self.version = int(ev.get("version") or 0)
            elif kind == "episode":
                self.counters["episodes"] += 1
                self.successes.append(bool(ev.get("success")))
            elif kind == "rejected":
                self.counters["rejected"] += 1
                self.tail.append(_clip(f"rejected {ev.get('path', ev.get('line', ''))}: {ev.get('reason', '')}"))
            elif kind == "dropped":
                self.counters["dropped_by_learner"] += 1
            elif kind == "snapshot":
                self.counters["snapshots"] += 1
                self.version = int(ev.get("version", self.version))
                self.last_snapshot = {k: ev.get(k) for k in ("path", "version", "checkpoint", "episodes",
                                                             "critic_updates", "actor_updates", "q_mean", "alpha", "log_std", "t")}
            self.version_counter += 1
            self._push(ev)

    def take_events(self) -> list[dict]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def log_tail(self, n: int = 5) -> str:
        lines = list(self.tail)[-n:]
        if self.log_path is not None:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(max(0, os.path.getsize(self.log_path) - 4000))
                    lines += [ln for ln in f.read().decode("utf-8", "replace").splitlines()
                              if ln.strip() and not ln.startswith(("$ ", "# exit"))][-n:]
            except OSError:
                pass
        return " | ".join(lines[-n:])

    # -- stopping ---------------------------------------------------------------------------
    def _writer_unblock(self) -> None:
        try:
            self._paths.put_nowait(None)
        except queue.Full:  # the writer drains the queue and exits on the broken pipe
            pass

    def request_stop(self, timeout_s: float, kill_after_s: float = 10.0) -> None:
        """EOF now (after the queued paths); SIGTERM at timeout_s, SIGKILL kill_after_s later (`enforce`)."""
        with self._lock:
            if self.stop_requested or self.returncode is not None:
                return
            self.stop_requested = True
            if self.state in ("running", "ready"):
                self.state = "stopping"
            self._term_at = time.monotonic() + timeout_s
            self._kill_at = self._term_at + kill_after_s
            self.version_counter += 1
        # the end marker must get in: drain the oldest paths rather than block (they stay on disk)
        while True:
            try:
                self._paths.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._paths.get_nowait()
                    with self._lock:
                        self.counters["dropped_queue_full"] += 1
                except queue.Empty:
                    pass

    def enforce(self) -> None:
        """Called periodically: the SIGTERM / SIGKILL deadlines of a stop."""
        if self.returncode is not None or self._term_at is None:
            return
        now = time.monotonic()
        if now >= self._kill_at:
            self._signal(signal.SIGKILL)
        elif now >= self._term_at:
            self._signal(signal.SIGTERM)
            self._term_at = self._kill_at  # once

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Blocking stop (node shutdown): EOF, SIGTERM after timeout_s, SIGKILL."""
        if self.returncode is None:
            self.request_stop(timeout_s)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(5.0)
        self._reader.join(5.0)

    @property
    def done(self) -> bool:
        return self.returncode is not None

    def status(self) -> dict:
        with self._lock:
            window = list(self.successes)
            return dict(state=self.state, pid=self.proc.pid, returncode=self.returncode, error=self.error,
                        elapsed_s=round(time.monotonic() - self.started, 1), version=self.version,
                        success_rate_last_20=round(sum(window) / len(window), 3) if window else None,
                        successes_in_window=sum(window), window=len(window), last_snapshot=dict(self.last_snapshot),
                        ready=dict(self.ready_info), pending_paths=self._paths.qsize(), **dict(self.counters),
                        log_path=str(self.log_path or ""), output_tail=list(self.tail)[-5:])


# =============================================================================================
# Policy side, no ROS
# =============================================================================================
class HeadSwapper:
    """Newest head notice in, swapped into the running policy only between episodes.

    `offer(notice)` (any thread) keeps the newest notice; `set_episode_active(bool)` follows the
    reward node. A worker thread loads a pending head while no episode is active: under `lock`
    (the policy runner's: a control step never sees half a head), after checking once more that
    no episode started meanwhile. `swaps` logs (time, version) for checking against episodes."""

    def __init__(self, get_policy: Callable[[], object], lock, heads_dir: Path | None,
                 running_checkpoint: Callable[[], Path | None] = lambda: None, clock: Callable[[], float] = time.time,
                 log: Callable[[str, bool], None] = lambda msg, ok: None):
        self._get_policy, self._lock_policy, self.heads_dir = get_policy, lock, heads_dir
        self._running_checkpoint, self._clock, self._log = running_checkpoint, clock, log
        self._cond = threading.Condition()
        self._pending: dict | None = None
        self._active = False  # unknown = not active (no reward node: swap right away)
        self._stop = False
        self.version = 0
        self.counters = collections.Counter(head_notices=0, head_swaps=0, head_refused=0, head_superseded=0,
                                            head_deferred_active=0)
        self.last_result = ""
        self.swaps: collections.deque = collections.deque(maxlen=1000)  # (clock time, version)
        self._thread = threading.Thread(target=self._work, name="head_swap", daemon=True)
        self._thread.start()

    def offer(self, notice: dict) -> None:
        with self._cond:
            self.counters["head_notices"] += 1
            if self._pending is not None:
                self.counters["head_superseded"] += 1
            self._pending = notice
            self._cond.notify_all()

    def set_episode_active(self, active: bool) -> None:
        with self._cond:
            self._active = bool(active)
            self._cond.notify_all()

    @property
    def episode_active(self) -> bool:
        return self._active

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5.0)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._pending is None or self._active):
                    if self._pending is not None and self._active:
                        self.counters["head_deferred_active"] += 1
                    self._cond.wait()
                if self._stop:
                    return
                notice, self._pending = self._pending, None
            self._swap(notice)

    def _resolve(self, notice: dict) -> Path:
        from ire_vla_ros.paths import confine

        path = notice.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("notice without a path")
        if self.heads_dir is None:
            raise ValueError("no head snapshot directory configured")
        return confine(self.heads_dir, Path(path).name if not Path(path).is_absolute() else path)

    def _refuse(self, why: str) -> None:
        self.counters["head_refused"] += 1
        self.last_result = f"refused: {why}"
        self._log(f"head snapshot refused ({why}); the running head stays", False)

    def _swap(self, notice: dict) -> None:
        try:
            version = int(notice.get("version", 0))
            path = self._resolve(notice)
        except (ValueError, TypeError) as exc:  # PathOutsideRoot is a ValueError
            return self._refuse(str(exc))
        if version <= self.version:
            return self._refuse(f"version {version} is not newer than the running {self.version}")
        running = self._running_checkpoint()
        trained_from = notice.get("checkpoint")
        if running is not None and trained_from and Path(trained_from).resolve() != Path(running).resolve():
            return self._refuse(f"trained from {trained_from}, the policy runs {running}")
        with self._lock_policy:
            with self._cond:
                if self._active:  # an episode started while we waited for the step in flight: later
                    if self._pending is None:
                        self._pending = notice
                    self.counters["head_deferred_active"] += 1
                    return
            t0 = time.perf_counter()
            try:
                self._get_policy().load_head_snapshot(path)
            except Exception as exc:  # noqa: BLE001 - HeadSnapshotError, OSError: the old head stays
                return self._refuse(f"{type(exc).__name__}: {exc}")
            load_ms = (time.perf_counter() - t0) * 1e3
            self.version = version
            self.counters["head_swaps"] += 1
            self.swaps.append((self._clock(), version))
        self.last_result = f"head v{version} swapped in ({load_ms:.1f} ms, {path.name})"
        self._log(self.last_result, True)


class TeleopYield:
    """The policy sends nothing while the operator acts: for `hold_s` after each non-idle operator
    action (a keyboard teleop's zero-motion idle messages, gripper unchanged, do not count, as in
    the recorder's intervention rule)."""

    def __init__(self, hold_s: float):
        self.hold_s = float(hold_s)
        self._last = -float("inf")
        self._gripper: float | None = None
        self.counters = collections.Counter(operator_actions=0, yielded_steps=0)

    def operator_action(self, names, values, now: float) -> bool:
        """Book one operator action message; True when it counts as an intervention."""
        from ire_vla_ros.robot.action_msg import split_action

        try:
            action_names, action, _, _ = split_action(list(names), list(values))
        except ValueError:
            return False
        grip = [i for i, n in enumerate(action_names) if n == "gripper"]
        gripper = float(action[grip[0]]) if grip else None
        previous, self._gripper = self._gripper, gripper
        moving = any(a for i, a in enumerate(action) if i not in grip)
        if not moving and (previous is None or gripper == previous):
            return False
        self._last = now
        self.counters["operator_actions"] += 1
        return True

    def yielding(self, now: float) -> bool:
        if now - self._last < self.hold_s:
            self.counters["yielded_steps"] += 1
            return True
        return False


# =============================================================================================
# ROS glue
# =============================================================================================
class OnlineRLHooks:
    """trainer_node's online-RL services, subscription and latched head topic (see the module docstring).

    The trainer calls: `busy_reason()` in ~/run_iteration (refuse while online RL runs), `tick()`
    from its timer, `status()` into its ~/status, `version` in its publish-on-change check, and
    `close()` in destroy_node. `start_iteration` is the trainer's own ~/run_iteration handler."""

    def __init__(self, node, params, *, offline_busy: Callable[[], str | None],
                 start_iteration: Callable[[], tuple[bool, str]], publish_status: Callable[[], None]):
        from std_msgs.msg import String
        from std_srvs.srv import SetBool, Trigger

        from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS

        self.node, self.p = node, params
        self._offline_busy, self._start_iteration, self._publish_status = offline_busy, start_iteration, publish_status
        self._String, self._SetBool = String, SetBool
        self.session: LearnerSession | None = None
        self.sessions = 0
        self.calls = collections.Counter(start_online_rl=0, stop_online_rl=0)
        self.refused = collections.Counter(busy=0, offline_running=0, not_running=0, start_failed=0)
        self.after_stop = ""  # "", stage2_started, stage2_refused: <why>, skipped
        self._stage2_pending = False
        self.episodes_seen = 0
        self.heads_published = 0
        self._published_heads = 0
        self._bump = 0
        self.head_pub = node.create_publisher(String, "~/head_snapshot", LATCHED_QOS)
        node.create_service(Trigger, "~/start_online_rl", self._on_start)
        node.create_service(Trigger, "~/stop_online_rl", self._on_stop)
        if params.online_episode_topic:
            node.create_subscription(String, params.online_episode_topic, self._on_episode_saved, RELIABLE_QOS)
        self._explore = (node.create_client(SetBool, params.online_explore_service)
                         if params.online_explore_service else None)

    @property
    def running(self) -> bool:
        return self.session is not None and not self.session.done

    @property
    def version(self) -> tuple:
        return (self.session.version_counter if self.session else -1, self._bump)

    def busy_reason(self) -> str | None:
        if self.running:
            return (f"refused: online RL is running (learner {self.session.state}); ~/stop_online_rl ends it "
                    "and starts the offline iteration")
        return None

    # -- services -------------------------------------------------------------------------------
    def _param(self, name):
        from rclpy.exceptions import ParameterUninitializedException

        try:
            return self.node.get_parameter(name).value
        except ParameterUninitializedException:
            return None

    def _refuse(self, resp, key: str, message: str):
        self.refused[key] += 1
        self._bump += 1
        resp.success, resp.message = False, message
        self.node.get_logger().warning(message, throttle_duration_sec=1.0)
        return resp

    def _on_start(self, _req, resp):
        self.calls["start_online_rl"] += 1
        if self.running:
            return self._refuse(resp, "busy", f"refused: online RL already running (learner {self.session.state})")
        why = self._offline_busy()
        if why:
            return self._refuse(resp, "offline_running", f"refused: {why}; start online RL when it has finished")
        from ire_vla_ros.vla.checkpoint import CheckpointError, resolve_checkpoint

        # absolute: the learner may run in `working_dir`, and paths cross processes
        ckpt_dir = Path(self._param("checkpoints_dir")).absolute()
        episodes_dir = Path(self._param("episodes_dir")).absolute()
        try:
            checkpoint = resolve_checkpoint(self._param("online_checkpoint") or ckpt_dir)
        except CheckpointError as exc:
            return self._refuse(resp, "start_failed", _clip(f"refused: no checkpoint to improve: {exc}"))
        log_dir = Path(self._param("log_dir") or ckpt_dir / "logs")
        cmd = learner_command(
            sys.executable, checkpoint=str(checkpoint.resolve()), episodes=str(episodes_dir),
            heads=str(ckpt_dir / "heads"), config=str(self._param("config") or ""), device=str(self._param("device")),
            snapshot_every_s=self._param("online_snapshot_every_s"),
            snapshot_every_episodes=self._param("online_snapshot_every_episodes"),
            replay_existing=bool(self._param("online_replay_existing")),
            extra=list(self._param("online_learner_args") or []))
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        try:
            self.session = LearnerSession(cmd, log_path=log_dir / f"online_{stamp}_{self.sessions + 1}.log",
                                          cwd=self._param("working_dir") or None,
                                          episodes_root=episodes_dir)
        except OSError as exc:
            return self._refuse(resp, "start_failed", _clip(f"cannot start the learner: {exc}"))
        self.sessions += 1
        self.after_stop, self._stage2_pending = "", False
        self._set_explore(True)
        resp.success = True
        resp.message = (f"online RL session {self.sessions} started (learner pid {self.session.proc.pid}, from "
                        f"{checkpoint.name}); episodes from {self._param('online_episode_topic')}, heads on ~/head_snapshot")
        self.node.get_logger().info(resp.message)
        self._publish_status()
        return resp

    def _on_stop(self, _req, resp):
        self.calls["stop_online_rl"] += 1
        if not self.running:
            return self._refuse(resp, "not_running", "online RL is not running")
        self.session.request_stop(self._param("online_stop_timeout_s"))
        self._stage2_pending = bool(self._param("online_stage2_on_stop"))
        self._set_explore(False)
        resp.success = True
        resp.message = ("stopping online RL: the learner finishes and writes a last head"
                        + ("; then the offline iteration (Stage 2) and the policy reload" if self._stage2_pending else ""))
        self.node.get_logger().info(resp.message)
        self._publish_status()
        return resp

    def _set_explore(self, on: bool) -> None:
        if self._explore is None:
            return
        if not self._explore.service_is_ready():
            self.node.get_logger().warning(f"{self._explore.srv_name} not available: set the policy's explore "
                                           f"parameter to {str(on).lower()} by hand")
            return
        self._explore.call_async(self._SetBool.Request(data=on))

    def _on_episode_saved(self, msg) -> None:
        self.episodes_seen += 1
        if self.running and not self.session.stop_requested:
            self.session.feed(msg.data)  # counted inside when dropped

    # -- periodic ---------------------------------------------------------------------------
    def tick(self) -> None:
        s = self.session
        if s is None:
            return
        s.enforce()
        for ev in s.take_events():
            if ev["event"] == "snapshot":
                self._publish_head(ev)
            elif ev["event"] == "rejected":  # e.g. a path outside episodes_dir: the learner learns nothing from it
                self.node.get_logger().warning(
                    f"online RL: learner rejected {ev.get('path', ev.get('line', ''))}: {ev.get('reason', '')} "
                    f"({s.counters['rejected']} so far)")
            elif ev["event"] == "exit":
                if s.state == "failed":
                    self.node.get_logger().error(f"online RL: {s.error} (log {s.log_path}); the policy keeps its "
                                                 "last good head, the episodes are on disk")
                else:
                    self.node.get_logger().info(f"online RL stopped: {s.counters['episodes']} episodes, head v{s.version}")
                if self._stage2_pending:
                    self._stage2_pending = False
                    ok, message = self._start_iteration()
                    self.after_stop = "stage2_started" if ok else f"stage2_refused: {_clip(message, 200)}"
                    self._bump += 1

    def _publish_head(self, ev: dict) -> None:
        notice = {k: ev.get(k) for k in ("path", "version", "checkpoint", "episodes", "actor_updates",
                                         "critic_updates", "q_mean", "alpha", "t")}
        self.head_pub.publish(self._String(data=json.dumps(notice, default=str)))
        self.heads_published += 1
        self.node.get_logger().info(f"head v{notice['version']} published ({notice['episodes']} episodes)")

    def status(self) -> dict:
        out = dict(state="idle", session=self.sessions, after_stop=self.after_stop, calls=dict(self.calls),
                   refused=dict(self.refused), episodes_seen=self.episodes_seen, heads_published=self.heads_published)
        if self.session is not None:
            out.update(self.session.status())
            out["session"] = self.sessions
        return out

    def close(self) -> None:
        if self.running:
            self.node.get_logger().warning("shutting down: stopping the online learner")
            self.session.close(min(10.0, float(self._param("online_stop_timeout_s"))))


class PolicyOnlineHooks:
    """policy_node's head swap and teleop yield (see the module docstring). The node calls
    `yielding(now)` before sending a command, `stats()` into its diagnostics and `close()`."""

    def __init__(self, node, params, runner, checkpoint_root: Path):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool, String

        from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS

        self.node, self.runner = node, runner
        heads = Path(params.head_snapshot_dir) if params.head_snapshot_dir else Path(checkpoint_root) / "heads"
        log = node.get_logger()

        def report(msg: str, ok: bool) -> None:
            (log.info if ok else log.error)(msg)

        self.swapper = HeadSwapper(lambda: runner.policy, runner.lock, heads, lambda: runner.checkpoint,
                                   clock=lambda: node.get_clock().now().nanoseconds * 1e-9, log=report)
        self.teleop = TeleopYield(params.teleop_yield_s)
        self.bad_notices = 0
        #: (image stamp, head version) of recent commands: which head acted in which episode step
        self.commands: collections.deque = collections.deque(maxlen=5000)
        if params.head_snapshot_topic:
            node.create_subscription(String, params.head_snapshot_topic, self._on_head, LATCHED_QOS)
        if params.episode_active_topic:
            node.create_subscription(Bool, params.episode_active_topic,
                                     lambda m: self.swapper.set_episode_active(m.data), LATCHED_QOS)
        if params.teleop_action_topic:
            node.create_subscription(JointState, params.teleop_action_topic, self._on_teleop, RELIABLE_QOS)

    def _on_head(self, msg) -> None:
        try:
            notice = json.loads(msg.data)
            if not isinstance(notice, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self.bad_notices += 1
            self.node.get_logger().error(f"head notice refused: {exc}", throttle_duration_sec=1.0)
            return
        self.swapper.offer(notice)

    def _on_teleop(self, msg) -> None:
        self.teleop.operator_action(msg.name, msg.position, time.monotonic())

    def yielding(self) -> bool:
        return self.teleop.yielding(time.monotonic())

    def on_command(self, image_stamp: float) -> None:
        """Book a command sent (called under the runner's lock: the version is the head that acted)."""
        self.commands.append((float(image_stamp), self.swapper.version))

    def set_yield_s(self, value: float) -> None:
        self.teleop.hold_s = float(value)

    def stats(self) -> dict:
        return {**dict(self.swapper.counters), **dict(self.teleop.counters), "head_version": self.swapper.version,
                "head_last_result": self.swapper.last_result, "head_bad_notices": self.bad_notices,
                "episode_active": self.swapper.episode_active}

    def close(self) -> None:
        self.swapper.close()
