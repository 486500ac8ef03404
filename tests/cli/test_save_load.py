"""switchhead.io: save/load round trips exactly, keeps tied weights tied, and never unpickles."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

import switchhead
import tiny_model
from switchhead.io import LoadError, SaveError, load, save


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


def test_load_refuses_an_archive_with_pickled_inputs(converted, saved):
    _, new, args = converted
    torch.export.save(torch.export.export(new, args, strict=False), saved / "model.pt2")  # keeps example inputs
    with pytest.raises(LoadError, match="pickled example inputs"):
        load(saved)


def test_load_refuses_an_archive_carrying_code(saved):
    program = saved / "model.pt2"
    with zipfile.ZipFile(program, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(LoadError, match="refusing to load"):
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
    read = switchhead.io._read_weights
    monkeypatch.setattr(switchhead.io, "_read_weights",
                        lambda path, device: {k: torch.zeros_like(v) for k, v in read(path, device).items()})
    with pytest.raises(SaveError, match="differs"):
        save(new, tmp_path / "out", args)
    assert not (tmp_path / "out").exists()
