"""A converted module moved with .to() runs on the new device: the graph's device constants move too."""

from __future__ import annotations

import copy

import torch
from helpers import converted
from zoo import ZOO_BY_NAME

import switchhead


def _devices(module: torch.nn.Module) -> set[str]:
    found = set()
    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            found |= {str(n.kwargs["device"]) for n in graph_module.graph.nodes if "device" in n.kwargs}
    return found


def test_moved_copy_runs_on_the_new_device_and_the_original_stays() -> None:
    # HF Llama's capture holds arange(device=cpu) and .to() metadata checks: "meta" stands in for a GPU
    _, new = converted("hf_llama_gqa")
    assert _devices(new) == {"cpu"}
    moved = copy.deepcopy(new).to("meta")
    assert _devices(moved) == {"meta"} and _devices(new) == {"cpu"}
    args, kwargs = ZOO_BY_NAME["hf_llama_gqa"].other_inputs()
    out = moved(*[a.to("meta") for a in args], **kwargs)
    assert out.logits.device.type == "meta"


def test_loaded_module_follows_moves(tmp_path) -> None:
    _, new = converted("hf_llama_gqa")
    args, kwargs = ZOO_BY_NAME["hf_llama_gqa"].example_inputs()
    switchhead.save(new, tmp_path / "out", args, kwargs)
    loaded = switchhead.load(tmp_path / "out")
    assert _devices(loaded.to("meta")) <= {"meta"}


class _AutocastRegion(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # like HF's rotary embedding
            z = y.float() @ y.float().t()
        return z.to(dtype=y.dtype)


def test_autocast_regions_follow_the_device_type() -> None:
    from switchhead.device import follow_device_moves, retarget_devices

    module = follow_device_moves(torch.export.export(_AutocastRegion(), (torch.randn(3, 4),), strict=False).module())

    def region_devices(m):
        return [n.args[0] for n in m.graph.nodes if "autocast" in str(n.target)]

    assert region_devices(module) == ["cpu"]
    # the retarget itself, cpu -> cuda, without a GPU
    assert retarget_devices(copy.deepcopy(module), torch.device("cpu"), torch.device("cuda")) >= 1
    moved = copy.deepcopy(module)
    retarget_devices(moved, torch.device("cpu"), torch.device("cuda"))
    assert region_devices(moved) == ["cuda"] and region_devices(module) == ["cpu"]


class _FloatRotary(torch.nn.Module):
    """HF's rotary embedding in miniature: `.float()` casts that were no-ops while the model was
    captured in fp32, then the result cast back to the activations' dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.register_buffer("inv_freq", torch.rand(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)[None, :, None].float()  # [1, T, 1]
        angles = (positions @ self.inv_freq[None, None, :].float()).float()  # [1, T, 8]
        x = x + torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype)
        return self.attention(x, x, x, need_weights=False)[0]


def test_converted_and_loaded_models_run_under_autocast(tmp_path) -> None:
    # torch.export pins every no-op `.float()` with an fp32 metadata assert; autocast makes the matmul
    # before it bf16, so a converted model that kept those asserts could not be trained in bf16
    # (saving exports again, so a loaded model must lose them too)
    model = _FloatRotary().eval()
    x = torch.randn(2, 6, 16)
    new = switchhead.convert(model, (x,), config=switchhead.SwitchHeadConfig(init="upcycle"))
    switchhead.save(new, tmp_path / "out", (x,), {})
    loaded = switchhead.load(tmp_path / "out")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual, reloaded = model(x), new(x), loaded(x)
    # (the capture also baked `.to(x.dtype)` in as fp32, so only the values can be compared)
    assert switchhead.max_relative_error(expected.float(), actual.float()) < 5e-2
    torch.testing.assert_close(reloaded, actual)
