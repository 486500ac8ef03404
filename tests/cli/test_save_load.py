"""switchhead.io: save/load round trips exactly, keeps tied weights tied, and never unpickles."""

from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

import switchhead
import tiny_model
from switchhead.io import LoadError, SaveError, load, save
from helpers import forge_saved_graph


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = tiny_model.build_model()
    args = (tiny_model.tokens(),)
    return model, switchhead.convert(model, args), args


@pytest.fixture
def saved(converted, tmp_path):
    _, new, args = converted
    return save(new, tmp_path / "out", args)


def test_round_trip_is_exact(converted, saved):
    model, new, args = converted
    loaded = load(saved)
    for inputs in [args, (tiny_model.tokens(3, 9),)]:  # the example shape and another one
        with torch.no_grad():
            assert torch.equal(loaded(*inputs), new(*inputs))
    assert new.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in new.state_dict().items())
    assert switchhead.report_of(loaded).to_dict() == switchhead.report_of(new).to_dict()


def test_loaded_module_keeps_ties_and_trains(converted, saved):
    _, new, args = converted
    loaded = load(saved)
    params = dict(loaded.named_parameters(remove_duplicate=False))
    original = dict(new.named_parameters(remove_duplicate=False))
    assert original["head.weight"] is original["embed.weight"]
    assert params["head.weight"] is params["embed.weight"]
    assert {k: p.requires_grad for k, p in params.items()} == {k: p.requires_grad for k, p in original.items()}
    loaded(*args).square().mean().backward()
    experts = [k for k in params if "experts" in k or "router" in k]
    assert experts and all(params[k].grad is not None for k in experts)


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load() must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    load(saved)


def test_save_needs_no_inputs_and_never_re_exports(converted, tmp_path, monkeypatch):
    """The converted module remembers its example inputs, and its graph is stored as it is."""
    _, new, args = converted

    def refuse(*a, **k):
        raise AssertionError("save() must not call torch.export")

    monkeypatch.setattr(torch.export, "export", refuse)
    stages: list[str] = []
    first = save(new, tmp_path / "a", progress=stages.append)
    assert stages == ["write", "check"]  # what the command line shows while it saves
    loaded = load(first)
    again = load(save(loaded, tmp_path / "b"))  # a loaded module remembers them too
    other = (tiny_model.tokens(3, 9),)
    with torch.no_grad():
        assert torch.equal(again(*other), new(*other))


@pytest.mark.parametrize("forged", ["posix:system", "torch.serialization:os.system", "torch:sym_int.__globals__",
                                    "builtins:eval"])
def test_load_refuses_a_graph_calling_other_python_functions(saved, forged, tmp_path):
    def redirect(document):
        root = document["graphs"][-1]
        node = next(n for n in root["nodes"] if isinstance(n["target"], dict) and "fn" in n["target"])
        node["target"] = {"fn": forged}

    forge_saved_graph(saved, redirect)
    with pytest.raises(LoadError, match="refusing it|cannot find"):
        load(saved)


def test_load_refuses_what_is_not_a_complete_output(saved, tmp_path):
    with pytest.raises(LoadError, match="report.json is missing"):
        load(tmp_path)
    (saved / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="incomplete: model.safetensors"):
        load(saved)


def test_save_refuses_a_foreign_directory(converted, tmp_path):
    _, new, args = converted
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SaveError, match="not written by"):
        save(new, tmp_path, args)
    save(new, tmp_path, args, overwrite=True, check=False)
    assert (tmp_path / "mine.txt").read_text() == "keep" and load(tmp_path) is not None


def test_save_checks_the_round_trip(converted, tmp_path, monkeypatch):
    _, new, args = converted
    read = switchhead.io.read_weights
    monkeypatch.setattr(switchhead.io, "read_weights",
                        lambda path, device: {k: torch.zeros_like(v) for k, v in read(path, device).items()})
    with pytest.raises(SaveError, match="differs"):
        save(new, tmp_path / "out", args)
    assert not (tmp_path / "out").exists()


def test_saved_files_get_the_umask_mode(converted, tmp_path):
    _, new, _ = converted
    old = os.umask(0o022)
    try:
        out = save(new, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"model.graph.json": 0o644, "model.safetensors": 0o644, "report.json": 0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_save_refuses_to_replace_another_models_output(converted, tmp_path):
    _, new, _ = converted
    save(new, tmp_path / "out")
    save(new, tmp_path / "out")  # the same model again: replaced
    torch.manual_seed(1)
    other_model = nn_other()
    other = switchhead.convert(other_model, (torch.randn(2, 5, 12),))
    with pytest.raises(SaveError, match="another model's output"):
        save(other, tmp_path / "out")
    save(other, tmp_path / "out", overwrite=True)
    assert switchhead.report_of(load(tmp_path / "out")).parameters_before == sum(p.numel() for p in other_model.parameters())


def nn_other() -> torch.nn.Module:
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(12, 3, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    return Encoder().eval()


def test_a_forced_expert_impl_survives_save_and_load(tmp_path):
    model = tiny_model.build_model()
    args = (tiny_model.tokens(),)
    new = switchhead.convert(model, args, config=switchhead.SwitchHeadConfig(expert_impl="dense"))
    save(new, tmp_path / "out")
    back = load(tmp_path / "out")
    ops = (torch.ops.switchhead.expert_v.default, torch.ops.switchhead.expert_o.default)
    impls = [n.args[-1] for n in back.graph.nodes if n.target in ops]
    assert impls and set(impls) == {"dense"}
    with torch.no_grad():
        assert torch.equal(back(*args), new(*args))
