"""What an action vector means, stored with every checkpoint and episode file."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ActionSpec:
    """Names and bounds of the action vector, in the environment's units.

    Translation components are in units of `translation_scale_m` metres per control step,
    rotation components in units of `rotation_scale_rad` radians per step, the gripper in
    [-1 (open), 1 (closed)].
    """

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    translation_scale_m: float = 0.01
    rotation_scale_rad: float = 0.05
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (len(self.names) == len(self.low) == len(self.high)):
            raise ValueError("ActionSpec: names, low and high must have the same length")

    @property
    def dim(self) -> int:
        return len(self.names)

    def clip(self, action: np.ndarray) -> np.ndarray:
        return np.clip(action, np.asarray(self.low, np.float32), np.asarray(self.high, np.float32))

    def index(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["names"], d["low"], d["high"] = list(self.names), list(self.low), list(self.high)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "ActionSpec":
        return cls(
            names=tuple(d["names"]),
            low=tuple(float(x) for x in d["low"]),
            high=tuple(float(x) for x in d["high"]),
            translation_scale_m=float(d.get("translation_scale_m", 0.01)),
            rotation_scale_rad=float(d.get("rotation_scale_rad", 0.05)),
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def from_json(cls, s: str) -> "ActionSpec":
        return cls.from_dict(json.loads(s))


# Metaworld: mocap moves action * 1/100 m per step; gripper effort in [-1, 1].
METAWORLD_4D = ActionSpec(
    names=("dx", "dy", "dz", "gripper"), low=(-1.0,) * 4, high=(1.0,) * 4, translation_scale_m=0.01
)
# Robot default: end-effector delta pose + gripper (the paper's action space).
EE_DELTA_7D = ActionSpec(
    names=("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"),
    low=(-1.0,) * 7,
    high=(1.0,) * 7,
    translation_scale_m=0.01,
    rotation_scale_rad=0.05,
)
