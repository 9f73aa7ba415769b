"""The `~/action` message layout shared by the policy, teleop and recorder nodes, and the one
registry of named action specs.

An action travels as a sensor_msgs/JointState (a stamped, named float vector that every ROS tool
can echo and plot): `name = spec names [+ "log_prob", "value"]`, `position` = the matching values.
The policy appends its log-probability and value estimate (PPO needs them from the rollout); a
teleoperator sends the bare action. `header.stamp` is the stamp of the image the action was
computed from, which is how the recorder pairs it with its observation.

    names, values = pack_action(spec.names, action, log_prob, value)   # publisher side
    action_names, action, log_prob, value = split_action(msg.name, msg.position)  # subscriber side
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D, ActionSpec

#: Extra components the policy appends after the action (in this order).
POLICY_EXTRA: tuple[str, ...] = ("log_prob", "value")

#: Named action specs accepted by the nodes' `action_spec` parameters.
ACTION_SPECS: dict[str, ActionSpec] = {"metaworld_4d": METAWORLD_4D, "ee_delta_7d": EE_DELTA_7D}


def pack_action(spec_names: Sequence[str], action, log_prob: float | None = None,
                value: float | None = None) -> tuple[list[str], list[float]]:
    """(names, values) for a JointState action message.

    log_prob and value are appended together or not at all (the recorder stores them as a pair).
    """
    names = [str(n) for n in spec_names]
    values = [float(v) for v in np.asarray(action, dtype=np.float64).reshape(-1)]
    if len(names) != len(values):
        raise ValueError(f"action has {len(values)} components but the spec names {len(names)}")
    if (log_prob is None) != (value is None):
        raise ValueError("log_prob and value go together (both or neither)")
    if log_prob is not None:
        names += list(POLICY_EXTRA)
        values += [float(log_prob), float(value)]
    return names, values


def split_action(names, values) -> tuple[list[str], np.ndarray, float | None, float | None]:
    """JointState action layout -> (action names, action float32, log_prob or None, value or None)."""
    names = list(names)
    values = np.asarray(values, dtype=np.float64)
    if len(names) != len(values):
        raise ValueError(f"action message has {len(names)} names but {len(values)} positions")
    extra = {n: float(values[i]) for i, n in enumerate(names) if n in POLICY_EXTRA}
    keep = [i for i, n in enumerate(names) if n not in POLICY_EXTRA]
    if not keep:
        raise ValueError("action message has no action components")
    action = values[keep].astype(np.float32)
    if not np.all(np.isfinite(action)):
        raise ValueError("action message has non-finite components")
    return [names[i] for i in keep], action, extra.get("log_prob"), extra.get("value")


def spec_by_name(name: str) -> ActionSpec:
    """A named spec from ACTION_SPECS; ValueError naming the choices otherwise."""
    spec = ACTION_SPECS.get((name or "").strip().lower())
    if spec is None:
        raise ValueError(f"unknown action_spec {name!r}; one of {sorted(ACTION_SPECS)}")
    return spec


def check_action_spec_setting(value: str) -> str | None:
    """None if `value` is usable as an `action_spec` parameter (auto, a known name, ActionSpec
    JSON), else the reason (for parameter validation)."""
    value = (value or "").strip()
    if value == "auto" or value.lower() in ACTION_SPECS:
        return None
    try:
        ActionSpec.from_json(value)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the reason
        return f"auto, one of {sorted(ACTION_SPECS)} or ActionSpec JSON ({type(exc).__name__}: {exc})"
    return None


def resolve_action_spec(setting: str, names: Sequence[str]) -> ActionSpec:
    """'auto' (match names to a known spec, else [-1, 1] bounds), a known spec name, or ActionSpec JSON.

    The result's names must equal `names` (the names the action messages carry).
    """
    names = list(names)
    setting = (setting or "auto").strip()
    if setting == "auto":
        for spec in ACTION_SPECS.values():
            if list(spec.names) == names:
                return spec
        return ActionSpec(names=tuple(names), low=(-1.0,) * len(names), high=(1.0,) * len(names))
    spec = ACTION_SPECS.get(setting.lower()) or ActionSpec.from_json(setting)
    if list(spec.names) != names:
        raise ValueError(f"action names {names} do not match action_spec {list(spec.names)}")
    return spec
