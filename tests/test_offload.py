"""FSDP offload (worker.actor.fsdp.offload_*) trains exactly like no offload: FSDP2 on gloo, world size 1, a tiny
Qwen2 built from its config. On CPU the moves are no-ops, so these tests check the code path (CPUOffloadPolicy
with the model left in host memory, buffers placed, the optimizer state round trip), not a transfer."""

import pytest
import torch
import torch.distributed as dist

from mentor.single_controller.worker import free_port
from mentor.workers.offload import OptimizerOffload, fsdp_offload_kwargs, optimizer_state_bytes, place_buffers


@pytest.fixture(scope="module")
def gloo():
    """A world-size-1 process group: ours, or the one an earlier test of this process left (an in-process vLLM
    engine keeps its gloo group for the process's life)."""
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0,
                                world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip(f"this process is in a process group of world size {dist.get_world_size()}")
    yield
    if ours:
        dist.destroy_process_group()


def _tiny_model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg)


def _train(offload_params: bool, offload_optimizer: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = torch.device("cpu")
    model = _tiny_model()
    kwargs = {"mesh": init_device_mesh("cpu", (1,)), **fsdp_offload_kwargs(offload_params, dev)}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    place_buffers(model, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offload = OptimizerOffload(opt, dev, enabled=offload_optimizer)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        with offload.on_device():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        offload.offload()
        assert offload.offloaded is offload_optimizer
    assert optimizer_state_bytes(opt, "cpu") == 2 * 4 * sum(p.numel() for p in model.parameters())  # 2 fp32 moments
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def test_offload_params_and_optimizer_train_like_no_offload(gloo):
    reference = _train(offload_params=False, offload_optimizer=False)
    for params, optimizer in ((True, False), (False, True)):
        got = _train(offload_params=params, offload_optimizer=optimizer)
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)


def test_cpu_offload_policy_is_only_used_when_asked():
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert fsdp_offload_kwargs(False, torch.device("cpu")) == {}
    policy = fsdp_offload_kwargs(True, torch.device("cuda", 0))["offload_policy"]
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory  # pinned host memory on GPU runs
    assert fsdp_offload_kwargs(True, torch.device("cpu"))["offload_policy"].pin_memory is False


def test_optimizer_offload_keeps_the_step_counter_and_is_idempotent():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    offload = OptimizerOffload(opt, torch.device("cpu"))
    before = {k: v.clone() for k, v in opt.state[param].items()}
    offload.offload()
    offload.offload()
    offload.load()
    offload.load()
    assert set(opt.state[param]) == {"step", "exp_avg", "exp_avg_sq"}
    for key, value in before.items():
        torch.testing.assert_close(opt.state[param][key], value, rtol=0, atol=0)
