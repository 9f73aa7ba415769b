"""The policy node's control logic without ROS: the newest observations in, one safe command out.

    obs = LatestObservations(limits)              # sensor callbacks write here (any thread)
    loader = PolicyLoader(checkpoint, device)     # policy, ckpt = loader(), at start and on each reload
    runner = PolicyRunner(policy, ckpt, safety, decoder)
    pacer = ControlPacer(period_s, "frame")       # when the control thread acts
    while running:
        got_frame = obs.wait_frame(pacer.timeout(now()))
        if pacer.ready(now(), got_frame):
            with runner.lock:                     # parameter changes wait for the step in flight
                out = runner.step(obs.snapshot(), now_s)
                ... send out.command, runner.sent(...)
            pacer.done(now())

`step` swaps in a model offered by `ModelReloader` (between ticks, never during one), then: enabled?
-> e-stop / freshness precheck (image receive time AND header stamp) -> EE pose -> joints by the
checkpoint's names -> decode + resize (once per image) -> policy.act -> SafetyFilter. Every outcome
that is not a command is counted under its reason.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ire_vla_ros.robot.image_codec import ImageDecodeError, ImageLimits, resize_rgb
from ire_vla_ros.robot.safety import MotionDelta, Reason, SafetyConfig, SafetyFilter
from ire_vla_ros.robot.stats import RateMeter, RollingStats

__all__ = ["LatestObservations", "Snapshot", "PolicyRunner", "StepResult", "ControlPacer", "ModelReloader",
           "PolicyLoader", "Skip", "model_input_size", "checkpoint_location", "metadata_instruction",
           "instruction_refusal", "check_policy_params", "policy_health"]


class Skip:
    """Reasons for a tick without a command that are not the safety filter's (counter keys)."""

    DISABLED = "disabled"
    NEED_EE_POSE = "ee_pose_unknown"
    EE_FRAME = "ee_frame_mismatch"
    MISSING_JOINTS = "missing_joints"
    REJECTED_IMAGE = "rejected_images"
    INFERENCE_ERROR = "inference_errors"

    ALL = (DISABLED, NEED_EE_POSE, EE_FRAME, MISSING_JOINTS, REJECTED_IMAGE, INFERENCE_ERROR)


# ---------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What one control step sees. Times in seconds on the node clock."""

    image: object | None = None          # the Image / CompressedImage message (decoded lazily)
    image_stamp: float | None = None     # its header stamp
    image_rx: float | None = None        # when it arrived
    joints: dict = field(default_factory=dict)   # name -> (position, receive time)
    ee_pos: np.ndarray | None = None
    ee_quat: np.ndarray | None = None
    ee_time: float | None = None
    ee_frame_ok: bool = True
    instruction: str = ""


class LatestObservations:
    """Thread-safe store of the newest messages; `wait_frame` wakes the control thread on a new image.

    Images and instructions beyond the limits are refused (and counted) here, before anything is
    decoded or kept."""

    def __init__(self, limits: ImageLimits | None = None, max_instruction_bytes: int = 1024,
                 instruction: str = ""):
        self.limits = limits or ImageLimits()
        self.max_instruction_bytes = int(max_instruction_bytes)
        self._cond = threading.Condition()
        self._new_frame = False
        self._snap = Snapshot(instruction=instruction)
        self._joints: dict[str, tuple[float, float]] = {}
        self.counters: Counter = Counter({"oversize_images": 0, "oversize_instructions": 0, "frames": 0})
        self.last_rejection = ""

    def offer_image(self, msg, stamp_s: float, rx_s: float) -> str | None:
        """Keep `msg` as the newest image; returns the reason when it is refused (limits)."""
        reason = self.limits.check(msg)
        if reason is not None:
            with self._cond:
                self.counters["oversize_images"] += 1
                self.last_rejection = reason
            return reason
        with self._cond:
            self._snap.image, self._snap.image_stamp, self._snap.image_rx = msg, stamp_s, rx_s
            self.counters["frames"] += 1
            self._new_frame = True
            self._cond.notify_all()
        return None

    def set_joints(self, names, positions, rx_s: float) -> None:
        with self._cond:
            for name, pos in zip(names, positions):
                self._joints[name] = (float(pos), rx_s)

    def set_ee_pose(self, pos, quat, stamp_or_rx_s: float, frame_ok: bool = True) -> None:
        with self._cond:
            s = self._snap
            s.ee_pos, s.ee_quat, s.ee_time, s.ee_frame_ok = pos, quat, stamp_or_rx_s, frame_ok

    def set_instruction(self, text: str) -> tuple[bool, str]:
        """(accepted, reason). Longer than max_instruction_bytes (UTF-8): refused and counted."""
        refusal = instruction_refusal(text, self.max_instruction_bytes)
        if refusal is not None:
            with self._cond:
                self.counters["oversize_instructions"] += 1
            return False, refusal
        with self._cond:
            self._snap.instruction = text
        return True, ""

    @property
    def instruction(self) -> str:
        return self._snap.instruction

    def wait_frame(self, timeout: float) -> bool:
        """Block up to `timeout` s for an image newer than the last call; True if one came."""
        with self._cond:
            if not self._new_frame and timeout > 0:
                self._cond.wait(timeout)
            got, self._new_frame = self._new_frame, False
            return got

    def wake(self) -> None:
        """Wake a waiting control thread (shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def set_limits(self, max_pixels: int, max_bytes: int, max_instruction_bytes: int) -> None:
        """New limits for the messages that arrive from now on."""
        self.limits.max_pixels, self.limits.max_bytes = int(max_pixels), int(max_bytes)
        self.max_instruction_bytes = int(max_instruction_bytes)

    def stats(self) -> dict:
        return {**dict(self.counters), "instruction": self.instruction, "last_image_refusal": self.last_rejection,
                "max_image_pixels": self.limits.max_pixels, "max_image_bytes": self.limits.max_bytes,
                "max_instruction_bytes": self.max_instruction_bytes}

    def snapshot(self) -> Snapshot:
        with self._cond:
            s = self._snap
            return Snapshot(image=s.image, image_stamp=s.image_stamp, image_rx=s.image_rx, joints=dict(self._joints),
                            ee_pos=s.ee_pos, ee_quat=s.ee_quat, ee_time=s.ee_time, ee_frame_ok=s.ee_frame_ok,
                            instruction=s.instruction)


# ---------------------------------------------------------------------------------------------
# pacing
# ---------------------------------------------------------------------------------------------
class ControlPacer:
    """When the control thread acts, on a grid of `period_s` so the command stream stays steady.

    mode "timer": at each grid point, on the newest image (its age at the tick is up to a camera period).
    mode "frame": on the first new image that arrives from `early_s` before a grid point on, so the image
    is fresh; if none has come `late_s` after the grid point, on the newest image anyway. Either way the
    average rate is exactly 1 / period_s; after a stall the grid restarts instead of bursting."""

    MODES = ("timer", "frame")

    def __init__(self, period_s: float, mode: str = "frame", early_s: float | None = None,
                 late_s: float | None = None, now: float = 0.0):
        if mode not in self.MODES:
            raise ValueError(f"control trigger {mode!r} is not one of {self.MODES}")
        self.period = float(period_s)
        self.mode = mode
        self.early = 0.25 * self.period if early_s is None else float(early_s)
        self.late = 0.5 * self.period if late_s is None else float(late_s)
        self.due = float(now)

    def timeout(self, now: float) -> float:
        """How long to wait for a frame before acting regardless."""
        if self.mode == "timer":
            return max(0.0, self.due - now)
        return max(0.0, self.due + self.late - now)

    def ready(self, now: float, new_frame: bool) -> bool:
        if self.mode == "timer":
            return now >= self.due
        return (new_frame and now >= self.due - self.early) or now >= self.due + self.late

    def done(self, now: float) -> None:
        self.due += self.period
        if self.due < now - self.period:  # stalled for more than a period: restart the grid
            self.due = now + self.period


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------
@dataclass
class Command:
    delta: MotionDelta                  # safe metric step (SafetyFilter output)
    action: np.ndarray                  # the policy's action in env units, before the filter
    log_prob: float
    value: float
    image_stamp: float                  # header stamp of the image it was computed from (s)
    image_msg: object
    ee_pos: np.ndarray | None
    ee_quat: np.ndarray | None
    modified: list[str]


@dataclass
class StepResult:
    command: Command | None = None
    reason: str | None = None            # counter key when there is no command
    detail: str = ""                      # for the log


def model_input_size(policy) -> int | None:
    size = getattr(getattr(policy, "backbone", None), "image_size", None)
    if size is None:
        size = getattr(getattr(getattr(policy, "cfg", None), "backbone", None), "image_size", None)
    return int(size) if size else None


def checkpoint_location(arg: str) -> Path:
    """The `checkpoint` parameter as a path: as given if it exists or is absolute, else under the
    package share directory (where models/ is installed)."""
    path = Path(arg).expanduser()
    if path.is_absolute() or path.exists():
        return path
    from ire_vla_ros.paths import share_dir

    return share_dir() / path


def metadata_instruction(ckpt: Path) -> str:
    """The checkpoint metadata's `instruction`, or ""."""
    import json

    try:
        return str(json.loads((Path(ckpt) / "metadata.json").read_text()).get("instruction", "") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def instruction_refusal(text: str, max_bytes: int) -> str | None:
    """Why an instruction is refused (longer than max_bytes in UTF-8), else None."""
    n = len(text.encode("utf-8", "surrogatepass"))
    return f"{n} bytes > max_instruction_bytes {max_bytes}" if n > max_bytes else None


def check_policy_params(values: dict) -> str | None:
    """Why a set of policy_node parameter values (by name) is refused as a whole, else None."""
    try:
        SafetyConfig.from_params(values)
    except ValueError as exc:
        return str(exc)
    refusal = instruction_refusal(values["default_instruction"], values["max_instruction_bytes"])
    return None if refusal is None else f"default_instruction is {refusal}"


class PolicyLoader:
    """Loads the policy from the `checkpoint` parameter's location, following its `latest` pointer
    on every call (at start and on each reload). torch is imported here, not with this module.
    RuntimeError when torch or the device is missing."""

    def __init__(self, checkpoint: str, device: str = "auto", torch_num_threads: int = 0,
                 cuda_graphs: bool = True):
        try:
            import torch

            from ire_vla_ros.vla.checkpoint import load_checkpoint, resolve_checkpoint, resolve_device
        except ImportError as exc:
            raise RuntimeError(f"the policy needs torch and ire_vla_ros.vla: {exc}") from exc
        self._torch, self._load_checkpoint, self._resolve_checkpoint = torch, load_checkpoint, resolve_checkpoint
        self.set_num_threads(torch_num_threads)
        self.device = resolve_device(device)
        self.root = checkpoint_location(checkpoint)
        self.cuda_graphs = cuda_graphs

    def set_num_threads(self, n: int) -> None:
        """torch.set_num_threads for CPU inference; 0 leaves torch's choice."""
        if n > 0:
            self._torch.set_num_threads(int(n))

    def __call__(self) -> tuple:
        """(policy in eval mode, the checkpoint directory it came from)."""
        ckpt = self._resolve_checkpoint(self.root)
        policy = self._load_checkpoint(ckpt, device=self.device).eval()
        if self.cuda_graphs and policy.enable_cuda_graphs():  # False off CUDA (vla/cuda_graph.py)
            # Capture here, in the loader's thread (a reload runs beside the control thread, which
            # keeps acting on the old policy), not at the new policy's first control step.
            policy.warm_up()
        return policy, ckpt


class PolicyRunner:
    """One policy, one safety filter, the stats. `lock` serialises a step with parameter changes."""

    def __init__(self, policy, checkpoint: Path, safety: SafetyFilter, decoder: Callable,
                 needs_ee_pose: bool = False, explore: bool = False):
        self.lock = threading.RLock()
        self.policy = policy
        self.checkpoint = Path(checkpoint)
        self.safety = safety
        self.decoder = decoder
        self.needs_ee_pose = needs_ee_pose
        self.enabled = False
        self.explore = bool(explore)
        self.input_size = model_input_size(policy)
        self._pending: tuple | None = None
        self._pending_lock = threading.Lock()
        self._decoded_for = None
        self._decoded = None
        self.counters: Counter = Counter({"ticks": 0, "commands_sent": 0, "models_swapped": 0,
                                          **{k: 0 for k in Skip.ALL}})
        self.latency_ms = RollingStats(200)        # image stamp -> command sent
        self.inference_ms = RollingStats(200)
        self.decode_ms = RollingStats(200)         # decode + resize
        self.image_delay_ms = RollingStats(200)    # image stamp -> received by the node
        self.image_age_ms = RollingStats(200)      # image stamp -> picked up by a step
        self.command_rate = RateMeter(5.0)
        self.last_detail = ""

    # -- model swap --------------------------------------------------------------------------
    def offer_model(self, policy, checkpoint: Path) -> None:
        """Take `policy` at the start of the next step (called from the loader thread)."""
        with self._pending_lock:
            self._pending = (policy, Path(checkpoint))

    def _swap_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        self.policy, self.checkpoint = pending
        self.input_size = model_input_size(self.policy)
        self.safety.set_action_spec(self.policy.action_spec)
        self._decoded_for = None
        self.counters["models_swapped"] += 1

    # -- one control step --------------------------------------------------------------------
    def _skip(self, reason: str, detail: str = "") -> StepResult:
        if reason in self.counters:   # safety reasons are counted by the filter
            self.counters[reason] += 1
        self.last_detail = detail
        return StepResult(reason=reason, detail=detail)

    def step(self, obs: Snapshot, now: float) -> StepResult:
        """One tick at node time `now` (s): a Command or the reason there is none."""
        self.counters["ticks"] += 1
        self._swap_pending()
        if not self.enabled:
            return self._skip(Skip.DISABLED)
        policy = self.policy
        names = policy.joint_names
        present = [obs.joints[n] for n in names if n in obs.joints]
        joints_rx = min((rx for _, rx in present), default=None)
        if not obs.ee_frame_ok:
            return self._skip(Skip.EE_FRAME, "the EE pose is not in command_frame")
        pre = self.safety.precheck(now, obs.image_rx, joints_rx, obs.ee_time, image_stamp=obs.image_stamp)
        if not pre.ok:
            return StepResult(reason=pre.reason, detail=pre.reason)
        if self.needs_ee_pose and (obs.ee_time is None or now - obs.ee_time > self.safety.config.ee_pose_timeout_s):
            return self._skip(Skip.NEED_EE_POSE, "this motion backend needs a fresh EE pose")
        if len(present) != len(names):
            missing = [n for n in names if n not in obs.joints]
            return self._skip(Skip.MISSING_JOINTS, f"joint_states lacks {missing} (policy joints {names})")
        state = np.array([pos for pos, _ in present], dtype=np.float32)
        if not np.all(np.isfinite(state)):
            return self._skip(Skip.MISSING_JOINTS, "non-finite joint positions")
        if obs.image_stamp:
            self.image_age_ms.add((now - obs.image_stamp) * 1e3)
        image = self._decode(obs.image)
        if isinstance(image, Exception):
            return self._skip(Skip.REJECTED_IMAGE, f"image rejected: {image}")
        t0 = time.perf_counter()
        try:
            res = policy.act(image, state, obs.instruction, deterministic=not self.explore)
        except Exception as exc:  # noqa: BLE001 - a failing model must not kill the loop
            return self._skip(Skip.INFERENCE_ERROR, f"policy.act failed: {type(exc).__name__}: {exc}")
        self.inference_ms.add((time.perf_counter() - t0) * 1e3)
        action = np.asarray(res.action, dtype=np.float32).reshape(-1)
        out = self.safety.apply(action, obs.ee_pos)
        if not out.ok:
            return StepResult(reason=out.reason, detail=f"action dropped: {out.reason} ({action.tolist()})")
        return StepResult(command=Command(
            delta=out.delta, action=action, log_prob=float(res.log_prob), value=float(res.value),
            image_stamp=obs.image_stamp or 0.0, image_msg=obs.image, ee_pos=obs.ee_pos, ee_quat=obs.ee_quat,
            modified=out.modified))

    @property
    def estopped(self) -> bool:
        """E-stop latched or its link down (it can change while a step runs: check again after a send)."""
        return self.safety.estop_active or not self.safety.estop_link_ok

    def sent(self, command: Command, now: float) -> None:
        """Book a command that went out at node time `now`."""
        self.counters["commands_sent"] += 1
        self.command_rate.tick(now)
        if command.image_stamp:
            self.latency_ms.add((now - command.image_stamp) * 1e3)

    def _decode(self, msg):
        """Resized RGB for msg (decoded once per message) or the ImageDecodeError."""
        if msg is not self._decoded_for:
            t0 = time.perf_counter()
            try:
                self._decoded = resize_rgb(self.decoder(msg), self.input_size)
                self.decode_ms.add((time.perf_counter() - t0) * 1e3)
            except ImageDecodeError as exc:
                self._decoded = exc
            except Exception as exc:  # noqa: BLE001 - anything else a malformed message triggers
                self._decoded = ImageDecodeError(f"{type(exc).__name__}: {exc}")
            self._decoded_for = msg
        return self._decoded

    # -- stats -------------------------------------------------------------------------------
    def stats(self, now: float) -> dict:
        s = self.safety.snapshot()
        rej = s["rejections"]
        lat, inf = self.latency_ms.summary(), self.inference_ms.summary()
        return {
            "enabled": self.enabled, "explore": self.explore, "estop": s["estop"],
            "estop_link_ok": s["estop_link_ok"], "checkpoint": str(self.checkpoint),
            "cuda_graph": getattr(self.policy, "cuda_graph_status", "off"),
            "latency_ms_mean": lat["mean"], "latency_ms_p50": lat["p50"], "latency_ms_p95": lat["p95"],
            "inference_ms_mean": inf["mean"], "inference_ms_p95": inf["p95"],
            "decode_ms_mean": self.decode_ms.summary()["mean"],
            "image_delay_ms_mean": self.image_delay_ms.summary()["mean"],
            "image_age_at_tick_ms_mean": self.image_age_ms.summary()["mean"],
            "command_rate_hz": self.command_rate.rate(now),
            "dropped_nan_actions": rej[Reason.NAN_ACTION],
            "stale_skips": sum(rej[r] for r in Reason.STALE),
            "estop_skips": rej[Reason.ESTOP] + rej[Reason.ESTOP_LOST],
            **{f"reject_{k}": v for k, v in rej.items()},
            **{f"limit_{k}": v for k, v in s["modifications"].items()},
            **dict(self.counters),
        }


def policy_health(stats: dict) -> tuple[int, str]:
    """Diagnostic level (0 OK, 1 WARN) and message for a policy node's stats."""
    if stats["estop"] or not stats["estop_link_ok"]:
        return 1, "e-stop latched" if stats["estop"] else "e-stop lost"
    if not stats["enabled"]:
        return 1, "disabled (call ~/enable)"
    return 0, f"running at {stats['command_rate_hz']:.1f} Hz"


# ---------------------------------------------------------------------------------------------
# reload
# ---------------------------------------------------------------------------------------------
class ModelReloader:
    """Loads a checkpoint in a worker thread; the caller never waits.

    `request()` -> (accepted, message) at once; one load at a time. When the load finishes, a good
    model goes to `offer(policy, checkpoint)` (the runner swaps it between ticks) and `on_done(ok,
    message)` reports; a failed load leaves the running model alone."""

    def __init__(self, load: Callable[[], tuple], offer: Callable, on_done: Callable[[bool, str], None]):
        self._load, self._offer, self._on_done = load, offer, on_done
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counters: Counter = Counter({"reloads_requested": 0, "reloads_ok": 0, "reloads_failed": 0,
                                          "reloads_refused_busy": 0})
        self.last_result = ""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request(self) -> tuple[bool, str]:
        with self._lock:
            if self.running:
                self.counters["reloads_refused_busy"] += 1
                return False, "a reload is already running"
            self.counters["reloads_requested"] += 1
            self._thread = threading.Thread(target=self._work, name="policy_reload", daemon=True)
            self._thread.start()
        return True, "accepted: loading the newest checkpoint in the background"

    def stats(self) -> dict:
        return {**dict(self.counters), "reload_last_result": self.last_result, "reload_running": self.running}

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _work(self) -> None:
        try:
            policy, ckpt = self._load()
        except Exception as exc:  # noqa: BLE001 - CheckpointError and anything a broken file throws
            self.counters["reloads_failed"] += 1
            self.last_result = f"failed: {type(exc).__name__}: {exc}"
            self._on_done(False, self.last_result)
            return
        self._offer(policy, ckpt)
        self.counters["reloads_ok"] += 1
        self.last_result = f"loaded {ckpt}"
        self._on_done(True, self.last_result)
