"""Checkpoints: one directory per training stage, written atomically, verified on load.

Layout of `<root>/<name>/`:
  config.json                 PolicyConfig (backbone, action spec, joint names, head/LoRA sizes)
  heads.safetensors           actor + critic weights and normalization buffers
  lora_adapter/               PEFT adapter (adapter_config.json, adapter_model.safetensors)
  backbone_base.safetensors   base VLM weights, tiny preset only (a pretrained VLM loads from its path)
  tokenizer.json              tiny preset only
  metadata.json               stage, iteration, dataset manifest, eval results, time
  MANIFEST.json               size + sha256 of every file above; written last

The directory is built under a temporary name, every file fsynced, renamed into place, and only then
`<root>/latest` (a one-line text file naming the directory) is replaced. A crash at any point leaves
the previous `latest` valid. Loading checks the manifest (sizes and hashes) and tensor shapes, so a
truncated or mismatched checkpoint is refused with a clear error. No pickle anywhere.

Disk full: before writing, the tensors' size (plus `min_free_mb`) must fit on the disk, else
CheckpointError before anything is written; ENOSPC/EIO while writing anyway removes the temporary
directory and raises CheckpointError. Either way the previous checkpoints and `latest` are intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .policy import PolicyConfig, VLAPolicy

LATEST = "latest"
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another shape; or one
    that could not be written (disk full, I/O error)."""

#: Free space a checkpoint write leaves at least (on top of its own size).
DEFAULT_MIN_FREE_MB = 10.0


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _tensors(module_state: dict) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage (tied embeddings).
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module_state.items()}


def _state_bytes(policy: VLAPolicy) -> int:
    """What the checkpoint's tensors take on disk (an upper bound: every parameter and buffer)."""
    seen, total = set(), 0
    for t in list(policy.state_dict().values()):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def save_checkpoint(policy: VLAPolicy, root: str | Path, *, stage: str, iteration: int,
                    metadata: dict | None = None, name: str | None = None,
                    min_free_mb: float = DEFAULT_MIN_FREE_MB) -> Path:
    from ire_vla_ros.diskspace import DiskSpaceError, is_disk_error, require_free_space

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        require_free_space(root, min_free_mb, _state_bytes(policy) + 1024 * 1024, what="the checkpoint")
    except DiskSpaceError as exc:
        raise CheckpointError(f"checkpoint not written under {root}: {exc}") from None
    try:
        return _save(policy, root, stage=stage, iteration=iteration, metadata=metadata, name=name)
    except (OSError, SafetensorError) as exc:
        # safetensors reports ENOSPC/EIO as SafetensorError("... I/O error: ... (os error 28)")
        if not (is_disk_error(exc) or (isinstance(exc, SafetensorError) and "I/O error" in str(exc))):
            raise
        raise CheckpointError(f"checkpoint not written under {root}: {exc} "
                              f"(previous checkpoints and '{LATEST}' unchanged)") from None


def _save(policy: VLAPolicy, root: Path, *, stage: str, iteration: int, metadata: dict | None,
          name: str | None) -> Path:
    name = name or f"{time.strftime('%Y%m%dT%H%M%S')}-it{iteration}-{stage}"
    final = root / name
    if final.exists():
        name = f"{name}-{os.getpid()}-{time.monotonic_ns() % 100000}"
        final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", policy.cfg.to_dict())
        heads = {f"actor.{k}": v for k, v in policy.actor.state_dict().items()}
        heads |= {f"critic.{k}": v for k, v in policy.critic.state_dict().items()}
        for b in ("action_mean", "action_std", "state_mean", "state_std"):
            heads[f"norm.{b}"] = getattr(policy, b)
        save_file(_tensors(heads), str(tmp / "heads.safetensors"))
        policy.backbone.model.save_pretrained(str(tmp / "lora_adapter"))
        if policy.cfg.backbone.preset == "tiny":
            base = {k: v for k, v in policy.backbone.model.state_dict().items() if "lora_" not in k}
            save_file(_tensors(base), str(tmp / "backbone_base.safetensors"))
            (tmp / "tokenizer.json").write_text(policy.backbone.tokenizer.to_json())
        meta = {"stage": stage, "iteration": iteration, "created": time.time(), **(metadata or {})}
        _write_json(tmp / "metadata.json", meta)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        _write_json(tmp / MANIFEST, manifest)
        for p in files + [tmp / MANIFEST]:
            _fsync_file(p)
        for d in {p.parent for p in files} | {tmp}:
            _fsync_dir(d)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, name)
    return final


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    try:
        tmp.write_text(name + "\n")
        _fsync_file(tmp)
        os.replace(tmp, root / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a root whose `latest` names one."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file() or (path / "config.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not target.is_dir():
            raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
        return target
    raise CheckpointError(f"{path} is neither a checkpoint directory nor a root with a '{LATEST}' pointer")


def verify_manifest(ckpt: Path) -> dict:
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: {MANIFEST} missing (incomplete write?)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: unreadable ({e})") from e
    for rel, info in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: file {rel} listed in the manifest is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{ckpt}: {rel} is {size} bytes, manifest says {info['size']} (truncated?)")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{ckpt}: {rel} content does not match its sha256 (corrupted)")
    return manifest


def read_metadata(path: str | Path) -> dict:
    ckpt = resolve_checkpoint(path)
    try:
        return json.loads((ckpt / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: metadata.json unreadable ({e})") from e


def _load_strict(module: torch.nn.Module, state: dict, what: str, ckpt: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: {what} keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{ckpt}: {what}.{k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    module.load_state_dict(state)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> VLAPolicy:
    """Loads and verifies a checkpoint (or the `latest` of a root). Raises CheckpointError."""
    from peft import set_peft_model_state_dict

    ckpt = resolve_checkpoint(path)
    verify_manifest(ckpt)
    try:
        cfg = PolicyConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
        tokenizer_json = (ckpt / "tokenizer.json").read_text() if (ckpt / "tokenizer.json").is_file() else None
        policy = VLAPolicy(cfg, tokenizer_json=tokenizer_json)
        heads = load_file(str(ckpt / "heads.safetensors"))
        if cfg.backbone.preset == "tiny":
            base = load_file(str(ckpt / "backbone_base.safetensors"))
            own = {k for k in policy.backbone.model.state_dict() if "lora_" not in k}
            if set(base) != own:
                raise CheckpointError(f"{ckpt}: backbone_base keys do not match the configured tiny backbone")
            policy.backbone.model.load_state_dict(base, strict=False)
        adapter = load_file(str(ckpt / "lora_adapter" / "adapter_model.safetensors"))
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: cannot load ({type(e).__name__}: {e})") from e
    result = set_peft_model_state_dict(policy.backbone.model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{ckpt}: LoRA adapter does not fit the backbone ({result.unexpected_keys[:3]})")
    _load_strict(policy.actor, {k[6:]: v for k, v in heads.items() if k.startswith("actor.")}, "actor", ckpt)
    _load_strict(policy.critic, {k[7:]: v for k, v in heads.items() if k.startswith("critic.")}, "critic", ckpt)
    try:
        policy.set_normalization(*(heads[f"norm.{b}"] for b in ("action_mean", "action_std", "state_mean", "state_std")))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: normalization statistics missing or mismatched ({e})") from e
    policy.checkpoint_path = ckpt
    return policy.to(device).eval()


def resolve_device(device: str) -> str:
    """'auto' -> cuda when present, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device
