"""The episode recorder without ROS: observation pairing, the episode session, the writer thread.

recorder_node.py feeds it messages and service calls; tests drive it directly.

Pairing. A step is recorded when an action arrives. Its observation is found by stamp:

* the image whose stamp equals the action's stamp (the policy stamps its action with the image it
  acted on), else the newest image not after it, else the oldest one kept;
* for each recorded joint, the sample nearest in time to that image's stamp. Joints are merged by
  name with a stamp per name, so an arm and a gripper published on separate JointState messages
  (at different rates) pair correctly. The pairing error |joint stamp - image stamp| (the largest
  over the joints) is stored with every step (`step_info/joint_stamp_error_s`); steps whose error
  exceeds `tolerance_s` are counted as mismatches in ~/status and the episode metadata.

Buffers hold `window_s` seconds of messages (by stamp), not a number of messages: at 500 Hz a
30-message buffer covered 60 ms, and an older image stamp silently paired with the newest state.

Writing. Steps go through a bounded queue (`max_queue` steps) to a writer thread that owns the
writer (a ProcessEpisodeWriter: h5py in a child process, see safe_writer.py). A full queue drops
the step (counted). A write fault (disk full, I/O error) aborts the episode and is reported
through `on_result("failed", ...)`; the session returns to idle.

Rewards: `reward[t]` is the newest reward received before action t+1 arrives (or before the
episode ends), i.e. the reward that *followed* action t.

Interventions (HIL-SERL): with `intervention_hold_s` > 0 the operator's actions arriving during a
policy episode are recorded as steps flagged `step_info/intervention = 1` (the episode metadata
counts them); the policy's actions while the operator holds the robot are skipped and counted.
An idle operator (a keyboard teleop's zero-motion steps, gripper unchanged) does not intervene.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ire_vla_ros.robot.action_msg import resolve_action_spec, split_action

__all__ = ["StampBuffer", "JointStateCache", "Step", "RecorderStats", "EpisodeRecorder", "EpisodeSession",
           "select_joints", "image_size_problem", "health", "episode_metadata", "json_object", "check_recorder_params"]

NS = 1_000_000_000


class StampBuffer:
    """Items keyed by stamp (ns), kept for `window_s` seconds behind the newest stamp (and at most
    `max_items`, a memory bound). Thread-safe."""

    def __init__(self, window_s: float = 1.0, max_items: int = 4096):
        self.window_ns = int(max(0.0, float(window_s)) * NS)
        self._stamps: list[int] = []
        self._items: list[Any] = []
        self._max = max(1, int(max_items))
        self._lock = threading.Lock()

    def add(self, t_ns: int, item: Any) -> None:
        t_ns = int(t_ns)
        with self._lock:
            if self._stamps and t_ns < self._stamps[-1]:  # out of order: keep the list sorted
                i = bisect.bisect_right(self._stamps, t_ns)
                self._stamps.insert(i, t_ns)
                self._items.insert(i, item)
            else:
                self._stamps.append(t_ns)
                self._items.append(item)
            cut = bisect.bisect_left(self._stamps, self._stamps[-1] - self.window_ns)
            cut = max(cut, len(self._stamps) - self._max)
            if cut > 0:
                del self._stamps[:cut]
                del self._items[:cut]

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._items.clear()

    def prune(self, drop: Callable[[int], bool]) -> None:
        """Remove the items whose stamp satisfies `drop`."""
        with self._lock:
            keep = [i for i, t in enumerate(self._stamps) if not drop(t)]
            self._stamps = [self._stamps[i] for i in keep]
            self._items = [self._items[i] for i in keep]

    def __len__(self) -> int:
        return len(self._stamps)

    def span_s(self) -> float:
        with self._lock:
            return (self._stamps[-1] - self._stamps[0]) / NS if self._stamps else 0.0

    def lookup(self, t_ns: int) -> tuple[Any, int | None, bool]:
        """(item, its stamp, exact): the item stamped t_ns, else the newest not after t_ns, else
        the oldest kept (the nearest in time); (None, None, False) when empty."""
        with self._lock:
            if not self._stamps:
                return None, None, False
            i = bisect.bisect_right(self._stamps, int(t_ns)) - 1
            if i < 0:
                return self._items[0], self._stamps[0], False
            return self._items[i], self._stamps[i], self._stamps[i] == t_ns

    def nearest(self, t_ns: int) -> tuple[Any, int | None]:
        """(item, stamp) nearest in time to t_ns (either side); (None, None) when empty."""
        with self._lock:
            if not self._stamps:
                return None, None
            i = bisect.bisect_left(self._stamps, int(t_ns))
            if i == len(self._stamps) or (i > 0 and t_ns - self._stamps[i - 1] <= self._stamps[i] - t_ns):
                i -= 1
            return self._items[i], self._stamps[i]


class JointStateCache:
    """Joint positions by joint name, each name with its own stamps, from one or several JointState
    publishers (e.g. the arm at 500 Hz and the gripper at 50 Hz on separate messages)."""

    def __init__(self, window_s: float = 1.0, max_samples: int = 4096):
        self.window_s = float(window_s)
        self._max = int(max_samples)
        self._by_name: dict[str, StampBuffer] = {}
        self._order: list[str] = []  # names in the order first seen
        self._lock = threading.Lock()

    def add(self, t_ns: int, names: Sequence[str], positions: Sequence[float]) -> None:
        if len(names) != len(positions):
            raise ValueError(f"joint state has {len(names)} names but {len(positions)} positions")
        for name, pos in zip(names, positions):
            buf = self._by_name.get(name)
            if buf is None:
                with self._lock:
                    buf = self._by_name.setdefault(name, StampBuffer(self.window_s, self._max))
                    if name not in self._order:
                        self._order.append(name)
            buf.add(t_ns, float(pos))

    @property
    def names(self) -> list[str]:
        return list(self._order)

    def set_window(self, window_s: float) -> None:
        self.window_s = float(window_s)
        for buf in list(self._by_name.values()):
            buf.window_ns = int(max(0.0, window_s) * NS)

    def prune(self, drop: Callable[[int], bool]) -> None:
        for buf in list(self._by_name.values()):
            buf.prune(drop)

    def __len__(self) -> int:
        return max((len(b) for b in self._by_name.values()), default=0)

    def lookup(self, t_ns: int, wanted: Sequence[str] = ()) -> tuple[np.ndarray, list[str], int]:
        """(positions float32 in `wanted` order (all names seen, when empty), names, largest
        |sample stamp - t_ns| in ns). KeyError naming the joints never received."""
        names = list(wanted) or self.names
        missing = [n for n in names if n not in self._by_name or not len(self._by_name[n])]
        if missing or not names:
            raise KeyError(f"no joint state received for {missing or 'any joint'}")
        values, worst = [], 0
        for n in names:
            pos, t = self._by_name[n].nearest(t_ns)
            values.append(pos)
            worst = max(worst, abs(int(t) - int(t_ns)))
        return np.asarray(values, np.float32), names, worst


def select_joints(msg_names, msg_positions, wanted: list[str]) -> np.ndarray:
    """Joint positions in `wanted` order (all of the message's joints when `wanted` is empty)."""
    if not wanted:
        return np.asarray(msg_positions, dtype=np.float32)
    index = {n: i for i, n in enumerate(msg_names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise KeyError(f"joint state lacks {missing}")
    return np.asarray([msg_positions[index[n]] for n in wanted], dtype=np.float32)


def image_size_problem(width: int, height: int, step: int, nbytes: int, max_bytes: int) -> str | None:
    """Why an image message's size fields cannot be trusted (or it is too large), else None.
    Checked before anything is copied or decoded: a message may claim any size."""
    if nbytes > max_bytes:
        return f"{nbytes} bytes > max_image_bytes {max_bytes}"
    if int(height) * int(step) != nbytes or int(step) < int(width) or not width or not height:
        return f"{width}x{height} with row step {step} does not match its {nbytes} bytes of data"
    return None


def health(status: dict, last: dict) -> tuple[int, str]:
    """Diagnostic level (0 OK, 1 WARN, 2 ERROR) and message for a recorder status dict; `last`
    keeps the counters of the previous call (updated here) so each new failure or drop is reported."""
    level, message = 0, status["state"]
    if status["episodes_failed"] > last.get("failed", 0):
        level, message = 2, f"episode aborted: {status['last_error']}"[:300]
    elif status["steps_dropped"] > last.get("drops", 0):
        level, message = 1, f"{status['steps_dropped'] - last.get('drops', 0)} steps dropped (writer too slow)"
    elif status["last_error"]:
        level, message = 1, status["last_error"][:300]
    last.update(failed=status["episodes_failed"], drops=status["steps_dropped"])
    return level, message


def episode_metadata(params: dict, instruction: str, action_names: list[str], joint_names: list[str], *,
                     recorder: str, episode: int, policy_params: dict | None) -> dict:
    """Writer metadata of a new episode (built at its first step): the recorder's parameters in force
    (`params`, by name), the instruction in force and the policy's parameters (None: none received).
    ValueError when there is no instruction yet or the action_spec setting does not fit the actions."""
    if not instruction:
        raise ValueError(f"no instruction yet (topic {params['instruction_topic']} and parameter are empty)")
    return dict(
        instruction=instruction, task=params["task"] or instruction, source=params["source"],
        iteration=int(params["iteration"]), action_spec=resolve_action_spec(params["action_spec"], action_names),
        joint_names=joint_names, camera_names=(params["camera_name"],),
        metadata={"recorder": recorder, "action_topic": params["action_topic"], "episode_index": episode,
                  "recorder_params": dict(params),
                  "policy_params": policy_params,
                  "policy_params_note": "" if policy_params is not None else
                  f"nothing received on {params['policy_params_topic'] or '(off)'}"},
    )


def check_recorder_params(values: dict, action_topic: str, state: str) -> str | None:
    """Why a set of recorder_node parameter values (by name) is refused, else None. The recorded
    topic switches only between episodes (`action_topic`: recorded now; `state`: the session's)."""
    if values["action_topic"] != action_topic and state != "idle":
        return f"an episode is {state}: stop it before switching topics"
    for name in ("instruction", "task"):
        if len(values[name]) > values["max_instruction_chars"]:
            return f"{name}: longer than max_instruction_chars ({values['max_instruction_chars']})"
    return None


def json_object(text: str, max_chars: int = 100_000) -> dict | None:
    """`text` parsed as a JSON object; None when it is longer than max_chars, not JSON or not an object."""
    try:
        value = json.loads(text) if len(text) <= max_chars else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Step:
    image: Any                 # sensor_msgs/Image (decoded in the writer thread) or an RGB array
    joint_positions: np.ndarray
    action: np.ndarray
    timestamp: float
    reward: float = 0.0
    log_prob: float | None = None
    value: float | None = None
    image_exact: bool = False
    step_info: dict = field(default_factory=dict)


@dataclass
class RecorderStats:
    episodes_saved: int = 0
    episodes_discarded: int = 0
    episodes_failed: int = 0
    steps_written: int = 0
    steps_dropped: int = 0
    step_errors: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    last_path: str = ""
    last_error: str = ""
    write_time_s: float = 0.0     # the writer thread's busy time (decode, validate, hand over)
    file_write_s: float = 0.0     # the time the writing itself took (a child process's, when reported)


class EpisodeRecorder:
    """Writer thread + bounded step queue around an episode writer. No ROS.

    `writer_factory(meta) -> writer` creates the writer (EpisodeWriter-like: append(**kw),
    finalize(success, metadata=) -> path, abort()). `decode(image) -> RGB array` runs in the writer
    thread. `on_result(kind, payload)` is called from the writer thread with ("saved", path),
    ("discarded", reason), ("failed", (episode seq, reason): a write fault aborted that episode) or
    ("error", message: one step not recorded); keep it short (e.g. enqueue).
    Control commands (begin/end/abort) are never dropped; only steps count against `max_queue`.
    """

    def __init__(self, writer_factory: Callable[[dict], Any], *, max_queue: int = 64,
                 decode: Callable[[Any], np.ndarray] | None = None, camera_name: str = "main",
                 on_result: Callable[[str, Any], None] | None = None):
        from ire_vla_ros.episodes.safe_writer import EpisodeWriteError

        self._fault_types = (EpisodeWriteError, OSError)
        self.writer_factory = writer_factory
        self._decode = decode or (lambda img: img)
        self._camera = camera_name
        self._on_result = on_result or (lambda kind, payload: None)
        self.max_queue = max(1, int(max_queue))
        self._q: collections.deque = collections.deque()
        self._pending_steps = 0
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self._begins = 0
        self._seq = 0  # the episode the writer thread is on
        self.stats = RecorderStats()
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._thread.start()

    # producer side (any thread) --------------------------------------------------------
    def begin(self, meta: dict) -> int:
        """Queue the start of an episode; returns its sequence number (1, 2, ...)."""
        with self._cv:
            self._begins += 1
            seq = self._begins
        self._put(("begin", (seq, meta)))
        return seq

    def add_step(self, step: Step) -> bool:
        """Queue one step; False (and counted) when the queue is full."""
        with self._cv:
            if self._pending_steps >= self.max_queue:
                self.stats.steps_dropped += 1
                return False
            self._q.append(("step", step))
            self._pending_steps += 1
            self.stats.queue_depth = self._pending_steps
            self.stats.max_queue_depth = max(self.stats.max_queue_depth, self._pending_steps)
            self._cv.notify()
        return True

    def end(self, success: bool, metadata: dict | None = None) -> None:
        self._put(("end", (bool(success), metadata or {})))

    def abort(self, reason: str = "aborted") -> None:
        self._put(("abort", reason))

    def _put(self, item) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("recorder is closed")
            self._q.append(item)
            self._cv.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._q or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)
            return not self._q and not self._busy

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued work, abort an unfinished episode, stop the thread."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        writer = None
        broken = False  # the current episode failed: drop its steps
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if not self._q and self._closed:
                    break
                kind, payload = self._q.popleft()
                if kind == "step":
                    self._pending_steps -= 1
                    self.stats.queue_depth = self._pending_steps
                self._busy = True
            try:
                t0 = time.monotonic()
                if kind == "begin":
                    if writer is not None:
                        writer.abort()
                        self.stats.episodes_discarded += 1
                    writer, broken = None, False
                    self._seq, meta = payload
                    try:
                        writer = self.writer_factory(meta)
                    except Exception as exc:  # bad metadata, disk full, ...
                        broken = True
                        self._fail(f"cannot create episode: {exc}")
                elif kind == "step":
                    if writer is not None:
                        writer = self._write_step(writer, payload)
                        broken = writer is None
                    elif broken:
                        self.stats.steps_dropped += 1  # the episode failed: its steps go nowhere
                    else:
                        self.stats.step_errors += 1
                elif kind == "end":
                    success, metadata = payload
                    if writer is not None:
                        w, writer = writer, None
                        try:
                            path = w.finalize(success, metadata=metadata) if metadata else w.finalize(success)
                            # absolute: ~/episode_saved goes to other processes (the online learner)
                            # whose working directory may differ from this one's
                            path = os.path.abspath(path)
                            self.stats.file_write_s += float(getattr(w, "write_time_s", 0.0))
                            self.stats.episodes_saved += 1
                            self.stats.last_path = str(path)
                            self._on_result("saved", str(path))
                        except self._fault_types as exc:
                            self._fail(f"episode not saved: {exc}")
                        except Exception as exc:
                            self.stats.episodes_discarded += 1
                            self._on_result("discarded", f"episode not saved: {exc}")
                elif kind == "abort":
                    if writer is not None:
                        writer.abort()
                        writer = None
                        self.stats.episodes_discarded += 1
                        self._on_result("discarded", payload)
                self.stats.write_time_s += time.monotonic() - t0
            except Exception as exc:  # never let the thread die
                self.stats.last_error = f"writer thread: {exc}"
                self._on_result("error", self.stats.last_error)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        if writer is not None:
            try:
                writer.abort()
                self.stats.episodes_discarded += 1
                self._on_result("discarded", "recorder closed before the episode ended")
            except Exception:
                pass

    def _write_step(self, writer, step: Step):
        """Append one step; returns the writer, or None when a write fault ended the episode."""
        try:
            img = self._decode(step.image)
            kw = dict(images={self._camera: img}, joint_positions=step.joint_positions,
                      action=step.action, reward=step.reward, timestamp=step.timestamp)
            if step.log_prob is not None and step.value is not None:
                kw.update(log_prob=step.log_prob, value=step.value)
            if step.step_info:
                kw["step_info"] = step.step_info
            writer.append(**kw)
            self.stats.steps_written += 1
            return writer
        except self._fault_types as exc:
            try:
                writer.abort()
            except Exception:
                pass
            self._fail(str(exc))
            return None
        except Exception as exc:
            self.stats.step_errors += 1
            self.stats.last_error = f"step not recorded: {exc}"
            self._on_result("error", self.stats.last_error)
            return writer

    def _fail(self, message: str) -> None:
        self.stats.episodes_failed += 1
        self.stats.last_error = message
        self._on_result("failed", (self._seq, message))


# =============================================================================================
# session: episode state machine + pairing
# =============================================================================================
class EpisodeSession:
    """One recorder's episodes: idle -> starting -> recording -> (ending ->) idle. Thread-safe.

    `clock_ns()` is now on the stamp clock (the node clock). Observations stamped before the
    episode began are ignored (e.g. from before the sim reset), but only when their stamp is within
    `foreign_clock_s` of now: a camera stamping with another clock is never filtered.
    `make_meta(action_names, joint_names) -> dict` builds the episode's writer metadata at its
    first step (ValueError to refuse, e.g. no instruction yet).
    """

    STATES = ("idle", "starting", "recording", "ending")

    def __init__(self, recorder: EpisodeRecorder, *, clock_ns: Callable[[], int],
                 make_meta: Callable[[list[str], list[str]], dict], joint_names: Sequence[str] = (),
                 window_s: float = 1.0, tolerance_s: float = 0.02, foreign_clock_s: float = 5.0,
                 intervention_hold_s: float = 0.0, policy_terms_on_interventions: bool = True,
                 max_images: int = 4096):
        self.recorder = recorder
        self._clock_ns = clock_ns
        self._make_meta = make_meta
        self.joint_names = list(joint_names)
        self.tolerance_ns = int(tolerance_s * NS)
        self._foreign_ns = int(foreign_clock_s * NS)
        self.intervention_hold_ns = int(intervention_hold_s * NS)
        self.policy_terms_on_interventions = policy_terms_on_interventions
        self._last_intervention_ns = -(10**18)
        self._operator_gripper: float | None = None
        self.images = StampBuffer(window_s, max_items=max_images)
        self.joints = JointStateCache(window_s)
        self._lock = threading.RLock()
        self.state = "idle"
        self.episode = 0
        self._start_ns = 0
        self._pending: Step | None = None
        self._begun = False
        self._seq = 0
        self._reward = 0.0
        self._errors_ns: list[int] = []
        self._writer_results: collections.deque = collections.deque()
        self.counters = collections.Counter()
        self.reset_episode_counters()

    def reset_episode_counters(self) -> None:
        for key in ("episode_steps", "exact_image_steps", "pairing_mismatches", "interventions"):
            self.counters[key] = 0
        self._errors_ns = []

    def set_window(self, window_s: float) -> None:
        self.images.window_ns = int(max(0.0, window_s) * NS)
        self.joints.set_window(window_s)

    def set_tolerance(self, tolerance_s: float) -> None:
        self.tolerance_ns = int(tolerance_s * NS)

    def configure(self, *, window_s: float, tolerance_s: float, intervention_hold_s: float,
                  policy_terms_on_interventions: bool) -> None:
        """Everything that may change while it runs (a recorder's live parameters); see __init__."""
        self.set_window(window_s)
        self.set_tolerance(tolerance_s)
        self.intervention_hold_ns = int(intervention_hold_s * NS)
        self.policy_terms_on_interventions = bool(policy_terms_on_interventions)

    # inputs -------------------------------------------------------------------------------
    def _before_start(self, t_ns: int) -> bool:
        return t_ns < self._start_ns and abs(self._clock_ns() - t_ns) < self._foreign_ns

    def _stale_at_start(self, t_ns: int) -> bool:
        return t_ns < self._start_ns or abs(self._clock_ns() - t_ns) >= self._foreign_ns

    def add_image(self, t_ns: int, image: Any) -> None:
        if not self._before_start(t_ns):
            self.images.add(t_ns, image)

    def add_joints(self, t_ns: int, names: Sequence[str], positions: Sequence[float]) -> None:
        if not self._before_start(t_ns):
            self.joints.add(t_ns, names, positions)

    def set_reward(self, reward: float) -> None:
        self._reward = float(reward)

    def on_action(self, t_ns: int, names, values, *, intervention: bool = False) -> str | None:
        """Record one step for an action stamped t_ns; None, or why it was not recorded.

        With interventions tracked (`intervention_hold_s` > 0), every step carries
        step_info["intervention"]: 1 for an action of the intervening operator (teleop during a
        policy episode), 0 otherwise. The policy's own actions within `intervention_hold_s` of the
        operator's last one are not what the robot executed: skipped and counted. An intervention
        step of an episode whose steps carry log_prob/value gets 0 for both (flagged by the step's
        intervention value)."""
        with self._lock:
            if self.state != "recording":
                return f"not recording ({self.state})"
            now = self._clock_ns()
            if intervention:
                if self._operator_idle(names, values):
                    return "operator idle"
                self._last_intervention_ns = now
            elif self.intervention_hold_ns and now - self._last_intervention_ns < self.intervention_hold_ns:
                self.counters["skipped_during_intervention"] += 1
                return "the operator is intervening"
            if self._before_start(t_ns):
                self.counters["skipped_stale"] += 1  # acted on an observation of the previous episode
                return "action stamped before the episode started"
            image, img_ns, exact = self.images.lookup(t_ns)
            if image is None:
                self.counters["skipped_no_obs"] += 1
                return "no image yet in this episode"
            try:
                action_names, action, log_prob, value = split_action(names, values)
                joints, joint_names, err_ns = self.joints.lookup(img_ns, self.joint_names)
            except KeyError as exc:
                self.counters["skipped_no_obs"] += 1
                return f"{exc.args[0] if exc.args else exc}"
            except ValueError as exc:
                self.counters["rejected_actions"] += 1
                return str(exc)
            if not self._begun:
                try:
                    meta = self._make_meta(action_names, joint_names)
                except ValueError as exc:
                    self.counters["rejected_actions"] += 1
                    return str(exc)
                self._seq = self.recorder.begin(meta)
                self._begun = True
                self._action_names, self._joint_names = action_names, joint_names
            elif action_names != self._action_names:
                self.counters["rejected_actions"] += 1
                return f"action names {action_names} differ from the episode's {self._action_names}"
            info = {"joint_stamp_error_s": err_ns / NS}
            if self.intervention_hold_ns:
                info["intervention"] = float(intervention)
                if intervention and log_prob is None and self.policy_terms_on_interventions:
                    log_prob, value = 0.0, 0.0
                self.counters["interventions"] += int(intervention)
            self._push_pending()
            self._pending = Step(image=image, joint_positions=joints, action=action, timestamp=img_ns / NS,
                                 log_prob=log_prob, value=value, image_exact=exact, step_info=info)
            self.counters["episode_steps"] += 1
            self.counters["exact_image_steps"] += int(exact)
            self._errors_ns.append(err_ns)
            if err_ns > self.tolerance_ns:
                self.counters["pairing_mismatches"] += 1
                self.counters["pairing_mismatches_total"] += 1
                return None  # recorded, with its error (the caller may warn)
            return None

    def _operator_idle(self, names, values) -> bool:
        """A keyboard teleop publishes zero-motion steps while no key is held: not an intervention.
        Idle = every component but the gripper is 0 and the gripper has not changed."""
        try:
            action_names, action, _, _ = split_action(names, values)
        except ValueError:
            return False  # let on_action count the rejection
        grip = [i for i, n in enumerate(action_names) if n == "gripper"]
        gripper = float(action[grip[0]]) if grip else None
        previous, self._operator_gripper = self._operator_gripper, gripper
        moving = [a for i, a in enumerate(action) if i not in grip]
        return not any(moving) and (previous is None or gripper == previous)

    def _push_pending(self) -> None:
        """Queue the held-back step with the reward that followed it (caller holds the lock)."""
        if self._pending is None:
            return
        self._pending.reward = self._reward
        self.recorder.add_step(self._pending)
        self._pending = None

    # control ------------------------------------------------------------------------------
    def request_start(self) -> str | None:
        """idle -> starting; the reason it cannot start otherwise."""
        with self._lock:
            if self.state != "idle":
                return f"cannot start: an episode is {self.state} (stop or abort it first)"
            self.state = "starting"
            self._start_ns = self._clock_ns()
            return None

    def begin_recording(self) -> None:
        with self._lock:
            # observations of the previous episode go; the new episode's first one (published by a
            # reset while ~/start_episode was calling its services) stays
            self.images.prune(self._stale_at_start)
            self.joints.prune(self._stale_at_start)
            self._pending = None
            self._begun = False
            self._reward = 0.0
            self.episode += 1
            self.reset_episode_counters()
            self.state = "recording"

    def start_failed(self, why: str) -> None:
        with self._lock:
            self.state = "idle"
            self.recorder.stats.last_error = f"start failed: {why}"

    def episode_end(self) -> bool:
        """recording -> ending (no more steps); False when not recording."""
        with self._lock:
            if self.state != "recording":
                return False
            self.state = "ending"
            return True

    def pairing_summary(self) -> dict:
        errs = np.asarray(self._errors_ns, np.float64) / 1e6
        return {"joint_stamp_error_ms_max": float(errs.max()) if errs.size else 0.0,
                "joint_stamp_error_ms_mean": float(errs.mean()) if errs.size else 0.0,
                "pairing_tolerance_ms": self.tolerance_ns / 1e6,
                "pairing_mismatches": int(self.counters["pairing_mismatches"]),
                "exact_image_steps": int(self.counters["exact_image_steps"])}

    def finish(self, success: bool | None, why: str, metadata: dict | None = None) -> tuple[bool, str]:
        """Save (success given) or discard (None) the current episode: (done, message)."""
        with self._lock:
            if self.state not in ("recording", "ending"):
                return False, f"no episode is being recorded (state {self.state})"
            if success is not None:
                self._push_pending()
            else:
                self._pending = None
            steps, begun = self.counters["episode_steps"], self._begun
            self.state = "idle"
            self._begun = False
            if begun:
                if success is None:
                    self.recorder.abort(why)
                else:
                    meta = {"end_reason": why, "steps_seen": steps, "pairing": self.pairing_summary(),
                            "interventions": int(self.counters["interventions"])}
                    meta.update(metadata or {})
                    self.recorder.end(success, meta)
        if not begun:
            return True, f"episode {self.episode} had no steps: nothing saved"
        if success is None:
            return True, f"episode {self.episode} discarded ({why})"
        return True, (f"episode {self.episode} ({steps} steps, {'success' if success else 'failure'}) "
                      f"saving ({why})")

    def on_writer_result(self, kind: str, payload: Any) -> None:
        """EpisodeRecorder's `on_result` (writer thread): kept until `writer_results` hands it on."""
        self._writer_results.append((kind, payload))

    def writer_results(self):
        """Yield the writer's results since the last call, oldest first, as (kind, message, ended):
        a "failed" result ends the episode it aborted if that is still the current one (ended True).
        For the thread that reports them (the node's executor)."""
        while self._writer_results:
            kind, payload = self._writer_results.popleft()
            if kind == "failed":
                seq, message = payload
                yield kind, message, self.writer_failed(seq)
            else:
                yield kind, str(payload), False

    def writer_failed(self, seq: int) -> bool:
        """The writer aborted episode `seq` (disk full, I/O error): stop recording it if it is still
        the current one. True if it was."""
        with self._lock:
            if self.state in ("recording", "ending") and self._begun and seq == self._seq:
                self.state = "idle"
                self._begun = False
                self._pending = None
                return True
            return False

    def status(self) -> dict:
        s = self.recorder.stats
        c = self.counters
        return dict(
            state=self.state, episode=self.episode, episode_steps=c["episode_steps"],
            exact_image_steps=c["exact_image_steps"], skipped_no_obs=c["skipped_no_obs"],
            skipped_stale=c["skipped_stale"], rejected_actions=c["rejected_actions"],
            pairing_mismatches=c["pairing_mismatches"], pairing_mismatches_total=c["pairing_mismatches_total"],
            interventions=c["interventions"], skipped_during_intervention=c["skipped_during_intervention"],
            image_buffer_s=round(self.images.span_s(), 3),
            episodes_saved=s.episodes_saved, episodes_discarded=s.episodes_discarded,
            episodes_failed=s.episodes_failed,
            steps_written=s.steps_written, steps_dropped=s.steps_dropped, step_errors=s.step_errors,
            queue_depth=s.queue_depth, max_queue_depth=s.max_queue_depth, last_path=s.last_path,
            last_error=s.last_error, writer_thread_s=round(s.write_time_s, 3), file_write_s=round(s.file_write_s, 3),
        )
