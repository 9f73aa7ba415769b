"""The backbone's CUDA-graph replay (vla/cuda_graph.py) and the half-precision act path.

On this CPU machine the graph path must stay off and change nothing; the replay itself is checked
where CUDA exists (bench/gpu_act_profile.py measured it on an H100: identical outputs, 6.9x faster
act for blip2-opt-2.7b)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ire_vla_ros.vla.action_spec import EE_DELTA_7D
from ire_vla_ros.vla.backbone import BackboneConfig
from ire_vla_ros.vla.cuda_graph import GraphedForward
from ire_vla_ros.vla.policy import PolicyConfig, VLAPolicy


def _policy(device="cpu") -> VLAPolicy:
    torch.manual_seed(0)
    with torch.device(device):
        p = VLAPolicy(PolicyConfig(backbone=BackboneConfig(preset="tiny"), action_spec=EE_DELTA_7D,
                                   joint_names=[f"joint{i}" for i in range(7)]))
    p.to(device)
    p.set_normalization(np.zeros(7), np.ones(7), np.zeros(7), np.ones(7))
    return p.eval()


IMAGE = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
STATE = np.linspace(-0.5, 0.5, 7).astype(np.float32)


def test_act_under_half_precision_autocast_returns_float32_arrays():
    # A caller under autocast (bench/gpu_check.py did) got bf16 head outputs that numpy cannot hold.
    p = _policy()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = p.act(IMAGE, STATE, "push the button")
    assert out.action.dtype == np.float32 and np.all(np.isfinite(out.action))
    assert np.isfinite(out.log_prob) and np.isfinite(out.value)


def test_cuda_graphs_stay_off_on_cpu_and_change_nothing():
    p = _policy()
    before = p.act(IMAGE, STATE, "push the button").action
    assert p.enable_cuda_graphs() is False and p.cuda_graph_status == "off"
    assert np.array_equal(p.act(IMAGE, STATE, "push the button").action, before)


def test_graphed_forward_runs_cpu_inputs_eagerly():
    calls = []

    def forward(inputs):
        calls.append(1)
        return (inputs["x"] * 2,)

    g = GraphedForward(forward)
    (y,) = g({"x": torch.ones(3)})
    assert torch.equal(y, torch.full((3,), 2.0)) and calls == [1]
    assert g.eager_calls == 1 and g.replays == 0 and g.num_graphs == 0 and g.failure is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_capture_runs_eagerly_from_then_on_and_leaves_the_device_usable():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).cuda()

    def syncing_forward(inputs):  # .item() synchronises with the host: not allowed while capturing
        y = lin(inputs["x"])
        return (-y,) if float(y.abs().sum()) < 0 else (y,)

    g = GraphedForward(syncing_forward, warmup_calls=1)
    x = torch.randn(2, 8, device="cuda")
    with torch.no_grad():
        (out,) = g({"x": x})
        assert g.failure is not None  # the capture error is kept (the policy reports it in /diagnostics)
        torch.testing.assert_close(out, lin(x))  # the call that failed to capture still answers
        (again,) = g({"x": x + 1})
        torch.testing.assert_close(again, lin(x + 1))
        assert g.num_graphs == 0 and g.replays == 0 and g.eager_calls == 2
        ok = GraphedForward(lambda inputs: (lin(inputs["x"]),))  # the CUDA context survived the failure
        torch.testing.assert_close(ok({"x": x})[0], lin(x))
        assert ok.num_graphs == 1 and ok.failure is None
    p = _policy("cuda")
    assert p.enable_cuda_graphs()
    p._graphed_backbone.failure = g.failure
    assert p.cuda_graph_status.startswith("eager: ")
    assert np.all(np.isfinite(p.act(IMAGE, STATE, "push the button").action))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (measured on an H100: bench/results/)")
def test_graph_replay_matches_eager_and_follows_in_place_weight_loads():
    p = _policy("cuda")
    eager = p.act(IMAGE, STATE, "push the button").action
    assert p.enable_cuda_graphs()
    graphed = p.act(IMAGE, STATE, "push the button").action  # captures
    assert p.cuda_graph_status == "graphs=1"
    np.testing.assert_allclose(graphed, eager, atol=1e-5)
    # Another image through the same graph, then new LoRA weights loaded in place: replay follows eager.
    other = np.roll(IMAGE, 7, axis=0)
    state = {k: v + 0.01 * torch.randn_like(v) if "lora_" in k else v for k, v in p.state_dict().items()}
    p.load_state_dict(state)
    replay = p.act(other, STATE, "push the button").action
    p.disable_cuda_graphs()
    np.testing.assert_allclose(replay, p.act(other, STATE, "push the button").action, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_policy_loader_on_cuda_captures_before_the_policy_is_used():
    from ire_vla_ros.robot.runner import PolicyLoader

    models = Path(__file__).resolve().parents[1] / "models" / "metaworld_tiny"
    policy, _ = PolicyLoader(str(models), "cuda")()
    assert policy.cuda_graph_status == "graphs=1"  # captured by the loader, before any control step
    size = policy.backbone.image_size
    image = np.zeros((size, size, 3), np.uint8)
    first = policy.act(image, np.zeros(len(policy.joint_names), np.float32), "push the button").action
    assert policy.cuda_graph_status == "graphs=1" and np.all(np.isfinite(first))
    off, _ = PolicyLoader(str(models), "cuda", cuda_graphs=False)()
    assert off.cuda_graph_status == "off"
    np.testing.assert_allclose(off.act(image, np.zeros(len(off.joint_names), np.float32), "push the button").action,
                               first, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_reload_captures_in_its_thread_while_the_control_thread_keeps_acting():
    """~/reload on a GPU: the loader thread captures the new policy's graph while the control thread
    acts with the old one (its own graph) on the default stream. Neither may fail or fall back."""
    import threading

    from ire_vla_ros.robot.runner import PolicyLoader

    models = Path(__file__).resolve().parents[1] / "models" / "metaworld_tiny"
    loader = PolicyLoader(str(models), "cuda")
    running, _ = loader()
    size = running.backbone.image_size
    image = np.zeros((size, size, 3), np.uint8)
    state = np.zeros(len(running.joint_names), np.float32)
    reference = running.act(image, state, "push the button").action
    stop, actions, errors = threading.Event(), [], []

    def control():
        try:
            while not stop.is_set():
                actions.append(running.act(image, state, "push the button").action)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=control)
    thread.start()
    try:
        reloaded = [loader()[0] for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert not errors and len(actions) > 3
    assert all(np.allclose(a, reference, atol=1e-5) for a in actions)
    for policy in [running, *reloaded]:
        assert policy.cuda_graph_status == "graphs=1", policy.cuda_graph_status
        np.testing.assert_allclose(policy.act(image, state, "push the button").action, reference, atol=1e-5)
