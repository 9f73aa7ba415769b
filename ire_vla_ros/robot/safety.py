"""Safety filter between the policy and the arm (no ROS).

Everything the policy node publishes goes through `SafetyFilter` first:

1. `precheck(now, ...)` before inference - no command when
   - the e-stop is latched (`set_estop(True)` latches until `set_estop(False)`),
   - the e-stop link is required and lost (`set_estop_link(False)`: no live e-stop publisher),
   - the newest image or joint state is missing or older than `stale_timeout_s` by receive time
     (node clock), or the image's header stamp is more than `stale_timeout_s` away from now: a frame
     delivered late by a starved executor or a slow link is stale however recently it arrived,
   - the workspace box is enabled and the EE pose is unknown or older than `ee_pose_timeout_s`.
2. `apply(action, ee_position)` after inference -
   - NaN/inf anywhere in the action: dropped (no command),
   - action clipped to the ActionSpec bounds, converted to metres / radians per step,
   - workspace box: a step that would leave the box is clipped to the box boundary,
   - per-step clamps: translation norm <= `max_translation_m`, rotation norm <= `max_rotation_rad`
     (direction kept; applied after the box clip so a pose outside the box never jumps back).

Every rejection reason and every modification is counted (`rejections`, `modifications`).
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SafetyConfig", "SafetyFilter", "SafetyResult", "MotionDelta", "Reason", "action_to_delta"]


class Reason:
    """Rejection reasons (counter keys)."""

    ESTOP = "estop"
    ESTOP_LOST = "estop_lost"
    NO_IMAGE = "no_image"
    STALE_IMAGE = "stale_image"
    NO_JOINTS = "no_joints"
    STALE_JOINTS = "stale_joints"
    NO_EE_POSE = "no_ee_pose"
    STALE_EE_POSE = "stale_ee_pose"
    NAN_ACTION = "nan_action"
    BAD_ACTION_SHAPE = "bad_action_shape"

    STALE = (NO_IMAGE, STALE_IMAGE, NO_JOINTS, STALE_JOINTS, NO_EE_POSE, STALE_EE_POSE)
    ALL = (ESTOP, ESTOP_LOST) + STALE + (NAN_ACTION, BAD_ACTION_SHAPE)


# modification counter keys
ACTION_CLIPPED = "action_clipped_to_spec"
WORKSPACE_CLIPPED = "workspace_clipped"
TRANSLATION_CLAMPED = "translation_clamped"
ROTATION_CLAMPED = "rotation_clamped"
MODIFICATIONS = (ACTION_CLIPPED, WORKSPACE_CLIPPED, TRANSLATION_CLAMPED, ROTATION_CLAMPED)


@dataclass
class SafetyConfig:
    max_translation_m: float = 0.02        # per control step (norm)
    max_rotation_rad: float = 0.1          # per control step (norm)
    workspace_enabled: bool = True
    workspace_min: tuple[float, float, float] = (-0.6, -0.6, 0.0)
    workspace_max: tuple[float, float, float] = (0.6, 0.6, 0.8)
    stale_timeout_s: float = 0.5           # newest image / joint state older than this -> no command
    ee_pose_timeout_s: float = 0.5         # newest EE pose older than this -> no command (box enabled)

    @classmethod
    def from_params(cls, v: dict) -> "SafetyConfig":
        """From the policy node's parameter values (ValueError when they do not fit together)."""
        return cls(max_translation_m=v["max_translation_m"], max_rotation_rad=v["max_rotation_rad"],
                   workspace_enabled=v["workspace_enabled"], workspace_min=tuple(v["workspace_min_xyz"]),
                   workspace_max=tuple(v["workspace_max_xyz"]), stale_timeout_s=v["stale_timeout_s"],
                   ee_pose_timeout_s=v["ee_pose_timeout_s"])

    def __post_init__(self):
        if self.max_translation_m < 0 or self.max_rotation_rad < 0:
            raise ValueError("per-step clamps must be >= 0")
        if self.stale_timeout_s <= 0 or self.ee_pose_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        lo, hi = np.asarray(self.workspace_min, float), np.asarray(self.workspace_max, float)
        if lo.shape != (3,) or hi.shape != (3,):
            raise ValueError("workspace_min / workspace_max need 3 values (x, y, z)")
        if self.workspace_enabled and not np.all(lo <= hi):
            raise ValueError(f"workspace_min {tuple(lo)} must be <= workspace_max {tuple(hi)}")


@dataclass
class MotionDelta:
    """One control step in metric units (command frame)."""

    translation_m: np.ndarray                   # (3,)
    rotation_rad: np.ndarray                    # (3,) roll/pitch/yaw deltas (zeros for 4-D actions)
    gripper: float | None = None                # [-1, 1] or None when the action has no gripper
    has_rotation: bool = False


@dataclass
class SafetyResult:
    ok: bool
    reason: str | None = None
    delta: MotionDelta | None = None
    modified: list[str] = field(default_factory=list)


def action_to_delta(action: np.ndarray, spec) -> MotionDelta:
    """Env-unit action (already finite and clipped) -> metres / radians per step."""
    a = np.asarray(action, dtype=np.float64)

    def pick(names):
        out = np.zeros(len(names))
        found = False
        for i, n in enumerate(names):
            j = spec.index(n)
            if j is not None:
                out[i] = a[j]
                found = True
        return out, found

    t, _ = pick(("dx", "dy", "dz"))
    r, has_rot = pick(("droll", "dpitch", "dyaw"))
    g = spec.index("gripper")
    return MotionDelta(
        translation_m=t * float(spec.translation_scale_m),
        rotation_rad=r * float(spec.rotation_scale_rad),
        gripper=float(a[g]) if g is not None else None,
        has_rotation=has_rot,
    )


def _clamp_norm(v: np.ndarray, limit: float) -> tuple[np.ndarray, bool]:
    n = float(np.linalg.norm(v))
    if n > limit and n > 0:
        return v * (limit / n), True
    return v, False


class SafetyFilter:
    """Thread-safe: `set_estop` may be called from a subscription while the timer filters."""

    def __init__(self, config: SafetyConfig, action_spec):
        self.config = config
        self.spec = action_spec
        self._lo = np.asarray(action_spec.low, np.float64)
        self._hi = np.asarray(action_spec.high, np.float64)
        self._box_lo = np.asarray(config.workspace_min, np.float64)
        self._box_hi = np.asarray(config.workspace_max, np.float64)
        self._lock = threading.Lock()
        self._estop = False
        self._estop_link_ok = True
        self.rejections: Counter = Counter({r: 0 for r in Reason.ALL})
        self.modifications: Counter = Counter({m: 0 for m in MODIFICATIONS})

    # -- e-stop latch ---------------------------------------------------------------------
    def set_estop(self, active: bool) -> bool:
        """Latch (True) or release (False) the e-stop. Returns True when the state changed."""
        with self._lock:
            changed = self._estop != bool(active)
            self._estop = bool(active)
            return changed

    @property
    def estop_active(self) -> bool:
        return self._estop

    def set_estop_link(self, ok: bool) -> bool:
        """Whether a live e-stop publisher is there (when one is required). Returns True on change."""
        with self._lock:
            changed = self._estop_link_ok != bool(ok)
            self._estop_link_ok = bool(ok)
            return changed

    @property
    def estop_link_ok(self) -> bool:
        return self._estop_link_ok

    def set_config(self, config: SafetyConfig) -> None:
        """New limits (validated by SafetyConfig); the next precheck / apply uses them."""
        with self._lock:
            self._box_lo = np.asarray(config.workspace_min, np.float64)
            self._box_hi = np.asarray(config.workspace_max, np.float64)
            self.config = config

    def set_action_spec(self, action_spec) -> None:
        """Switch spec (after a checkpoint reload)."""
        with self._lock:
            self.spec = action_spec
            self._lo = np.asarray(action_spec.low, np.float64)
            self._hi = np.asarray(action_spec.high, np.float64)

    # -- checks ---------------------------------------------------------------------------
    def _reject(self, reason: str) -> SafetyResult:
        self.rejections[reason] += 1
        return SafetyResult(ok=False, reason=reason)

    def precheck(
        self,
        now: float,
        image_time: float | None,
        joints_time: float | None,
        ee_pose_time: float | None = None,
        image_stamp: float | None = None,
    ) -> SafetyResult:
        """Input freshness and e-stop, before running the policy. Times in seconds (node clock).

        `image_time` is when the image arrived, `image_stamp` its header stamp (None: not checked;
        an unset stamp, 0, is stale)."""
        c = self.config
        if self._estop:
            return self._reject(Reason.ESTOP)
        if not self._estop_link_ok:
            return self._reject(Reason.ESTOP_LOST)
        if image_time is None:
            return self._reject(Reason.NO_IMAGE)
        if now - image_time > c.stale_timeout_s:
            return self._reject(Reason.STALE_IMAGE)
        if image_stamp is not None and abs(now - image_stamp) > c.stale_timeout_s:
            return self._reject(Reason.STALE_IMAGE)  # old stamp, or a clock far ahead of ours
        if joints_time is None:
            return self._reject(Reason.NO_JOINTS)
        if now - joints_time > c.stale_timeout_s:
            return self._reject(Reason.STALE_JOINTS)
        if c.workspace_enabled:
            if ee_pose_time is None:
                return self._reject(Reason.NO_EE_POSE)
            if now - ee_pose_time > c.ee_pose_timeout_s:
                return self._reject(Reason.STALE_EE_POSE)
        return SafetyResult(ok=True)

    def apply(self, action, ee_position=None) -> SafetyResult:
        """Policy action (env units) -> safe metric step, or a rejection.

        `ee_position` (3,) in the command frame is required when the workspace box is enabled.
        """
        c = self.config
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != len(self._lo):
            return self._reject(Reason.BAD_ACTION_SHAPE)
        if not np.all(np.isfinite(a)):
            return self._reject(Reason.NAN_ACTION)
        if self._estop:  # may have latched during inference
            return self._reject(Reason.ESTOP)
        if not self._estop_link_ok:
            return self._reject(Reason.ESTOP_LOST)
        box_lo, box_hi = self._box_lo, self._box_hi
        modified = []
        clipped = np.clip(a, self._lo, self._hi)
        if np.any(clipped != a):
            modified.append(ACTION_CLIPPED)
        delta = action_to_delta(clipped, self.spec)

        if c.workspace_enabled:
            if ee_position is None:
                return self._reject(Reason.NO_EE_POSE)
            p = np.asarray(ee_position, np.float64).reshape(3)
            if not np.all(np.isfinite(p)):
                return self._reject(Reason.NO_EE_POSE)
            target = p + delta.translation_m
            boxed = np.clip(target, box_lo, box_hi)
            if np.any(boxed != target):
                modified.append(WORKSPACE_CLIPPED)
                delta.translation_m = boxed - p

        delta.translation_m, t_clamped = _clamp_norm(delta.translation_m, c.max_translation_m)
        if t_clamped:
            modified.append(TRANSLATION_CLAMPED)
        delta.rotation_rad, r_clamped = _clamp_norm(delta.rotation_rad, c.max_rotation_rad)
        if r_clamped:
            modified.append(ROTATION_CLAMPED)
        if delta.gripper is not None and not math.isfinite(delta.gripper):  # pragma: no cover
            return self._reject(Reason.NAN_ACTION)
        for m in modified:
            self.modifications[m] += 1
        return SafetyResult(ok=True, delta=delta, modified=modified)

    def snapshot(self) -> dict:
        """Counters for diagnostics."""
        return {"rejections": dict(self.rejections), "modifications": dict(self.modifications),
                "estop": self._estop, "estop_link_ok": self._estop_link_ok}
