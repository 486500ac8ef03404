"""switchhead.model_file: the model-file convention, without converting anything."""

from __future__ import annotations

import sys

import pytest
import torch

from switchhead.model_file import ModelFileError, load_model_file, split_inputs


@pytest.mark.parametrize("value, args_len, kwargs_keys", [
    (torch.zeros(2), 1, set()),
    ((torch.zeros(2), torch.zeros(3)), 2, set()),
    ({"input_ids": torch.zeros(2)}, 0, {"input_ids"}),
    (((torch.zeros(2),), {"mask": torch.zeros(2)}), 1, {"mask"}),
    (([torch.zeros(2)], {}), 1, set()),
])
def test_input_forms(value, args_len, kwargs_keys):
    args, kwargs = split_inputs(value, "inputs")
    assert isinstance(args, tuple) and len(args) == args_len and set(kwargs) == kwargs_keys


@pytest.mark.parametrize("value", [[torch.zeros(2)], 3, {1: torch.zeros(2)}])
def test_bad_input_forms(value):
    with pytest.raises(ModelFileError, match="inputs"):
        split_inputs(value, "inputs")


def test_module_level_model_and_inputs(write_model):
    loaded = load_model_file(write_model("import torch\nmodel = torch.nn.Linear(2, 3)\nexample_inputs = torch.zeros(4, 2)\n"))
    assert isinstance(loaded.model, torch.nn.Linear) and loaded.args[0].shape == (4, 2) and loaded.kwargs == {}


def test_inputs_from_the_model_itself(write_model):
    path = write_model("""
        import torch

        class Described(torch.nn.Linear):
            def example_inputs(self):
                return (torch.zeros(1, 2),)

        model = Described(2, 2)
    """)
    assert load_model_file(path).args[0].shape == (1, 2)


def test_file_is_imported_without_sys_path_or_package(write_model):
    path = write_model("import dataclasses, torch\n\n@dataclasses.dataclass\nclass C:\n    d: int = 2\n\n"
                       "model = torch.nn.Linear(C().d, 2)\nexample_inputs = (torch.zeros(1, 2),)\n")
    before = list(sys.path)
    loaded = load_model_file(path)
    assert sys.path == before
    assert loaded.module.__name__.startswith("switchhead_model_file_") and loaded.module.__file__ == str(path.resolve())


def test_exit_in_the_file_is_an_error(write_model):
    with pytest.raises(ModelFileError, match=r"model.py:2 .*SystemExit"):
        load_model_file(write_model("import sys\nsys.exit(3)\n"))


def test_main_block_does_not_run(write_model):
    path = write_model("import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = (torch.zeros(1, 2),)\n"
                       "if __name__ == '__main__':\n    raise SystemExit('ran main')\n")
    assert isinstance(load_model_file(path).model, torch.nn.Linear)


def test_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not a file"):
        load_model_file(tmp_path)
