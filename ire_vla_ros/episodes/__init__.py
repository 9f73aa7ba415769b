"""HDF5 episode store and datasets (no ROS).

The store API is imported eagerly (h5py + numpy only); the torch dataset helpers are loaded on
first access so that e.g. the recorder node does not pay for importing torch.
"""
from __future__ import annotations

from ire_vla_ros.episodes.store import (
    EXTENSION,
    FORMAT_VERSION,
    PARTIAL_EXTENSION,
    SOURCES,
    Episode,
    EpisodeError,
    EpisodeInfo,
    EpisodeWriter,
    ScanResult,
    make_episode_name,
    read_episode,
    read_episode_info,
    scan_episodes,
)

_DATASET_NAMES = {
    "EpisodeStepDataset", "mixed_sampler", "mixed_dataset", "mixing_weights", "collate", "action_statistics",
}

__all__ = [
    "EXTENSION", "FORMAT_VERSION", "PARTIAL_EXTENSION", "SOURCES", "Episode", "EpisodeError", "EpisodeInfo",
    "EpisodeWriter", "ScanResult", "make_episode_name", "read_episode", "read_episode_info", "scan_episodes",
    *sorted(_DATASET_NAMES),
]


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from ire_vla_ros.episodes import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
