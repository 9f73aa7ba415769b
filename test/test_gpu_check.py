"""bench/gpu_check.py runs its whole code path on CPU with the `small` preset (on a GPU machine the
same script builds blip2-opt-2.7b in bf16), and the real-size preset has the published size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ire_vla_ros.vla.backbone import BackboneConfig, count_parameters

REPO = Path(__file__).resolve().parents[1]


# The GPU machine's image has torch, transformers, peft, safetensors, h5py and opencv, but no ROS
# and no MuJoCo: the check runs with those imports made to fail, as they would there.
_WITHOUT_ROS_AND_MUJOCO = (
    "import runpy, sys\n"
    "for name in ('rclpy', 'mujoco', 'metaworld', 'gymnasium', 'sensor_msgs', 'std_msgs'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_ROS_AND_MUJOCO, str(REPO / "bench" / "gpu_check.py"),
                           "--preset", "small", "--device", "cpu", "--threads", "1", "--act-repeats", "3",
                           "--update-steps", "2", "--minibatch", "8", "--batch", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["amp_dtype"] == "None"
    assert 10e6 < r["backbone_parameters"] < 100e6  # "tens of millions"
    assert r["sft_loss_finite"] is True
    assert r["latent_dim"] == 512 and r["latent_bytes_fp16"] == r["latent_tokens"] * 512 * 2
    for key in ("act_ms_p50", "sft_step_seconds", "stage1_seconds_cached", "stage1_seconds_recompute_backbone"):
        assert r[key] > 0


def test_real_size_preset_matches_published_blip2_opt_2_7b():
    # Salesforce/blip2-opt-2.7b: 3.74 B parameters (ViT-g 1.0 B + Q-Former 0.1 B + OPT-2.7B 2.65 B).
    n = count_parameters(BackboneConfig(preset="blip2-opt-2.7b"))
    assert 3.70e9 < n < 3.80e9


def test_act_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "act_profile.json"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_ROS_AND_MUJOCO, str(REPO / "bench" / "gpu_act_profile.py"),
                           "--preset", "tiny", "--device", "cpu", "--repeats", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["aten_ops_per_act"] > 100
    assert set(r["stage_ms_p50"]) == {"prepare", "backbone", "heads", "to_host", "act"}
    assert r["top_self_cpu"] and all(row["ms_per_act"] >= 0 for row in r["top_self_cpu"])
