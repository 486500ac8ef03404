"""Load a user's model.py: the model to convert and its example inputs.

The convention: the file defines a module-level `model` (an nn.Module) or a function
`build_model()` returning one, and `example_inputs` or `example_inputs()` giving the positional
inputs (a tuple), the keyword inputs (a dict) or both (`(args, kwargs)`). Other names can be picked
(`entry`, `inputs`). Without example inputs in the file, a model that describes its own inputs
(an `example_inputs()` method, a Hugging Face `dummy_inputs`) is used as is.

For healing from text files (`--heal-data`), the file also provides the model's tokenizer: a
module-level `tokenizer` or a function `get_tokenizer()` returning one (only called when needed).
It must behave like a Hugging Face tokenizer: `tokenizer(text, add_special_tokens=False)
["input_ids"]` gives a text's token ids, and `eos_token_id` (or `sep_token_id`), when not None,
separates documents; encoders healed on sentences also need the batch call
`tokenizer(texts, padding=..., truncation=True, max_length=N, return_tensors="pt")`.

The file is imported from its path under a private module name: it needs no package and no
`sys.path` entry (its own folder is on `sys.path` while it runs, as with `python model.py`, so it
can import the files next to it). Every failure is a ModelFileError with one line that points at
the user's own code (file:line), never at ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import sys
import traceback
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator

import torch

from switchhead.errors import MissingInputsError, SwitchHeadError
from switchhead.inputs import resolve_inputs

MODEL_NAMES = ("model", "build_model")
INPUT_NAMES = ("example_inputs",)
TOKENIZER_NAMES = ("tokenizer", "get_tokenizer")


class ModelFileError(SwitchHeadError):
    """The model file cannot be imported, or does not give a model and its inputs."""


@dataclasses.dataclass
class ModelFile:
    path: Path
    module: types.ModuleType
    model: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask_added: bool = False  # the model's own dummy_inputs got an all-ones attention_mask


def load_model_file(path: str | Path, entry: str | None = None, inputs: str | None = None,
                    check_module: Callable[[torch.nn.Module], None] | None = None) -> ModelFile:
    """Import `path` and return its model and example inputs (see the module docstring).

    `check_module(module)` runs on every module the file builds, when it registers its first child:
    for a Hugging Face model that is when its config is known and before `from_pretrained` reads
    the weights (SmolLM2-135M's GGUF: 5 s in, of 17 s). A SwitchHeadError it raises stops the file
    and is raised as is, so options the config already refutes fail before the long load.
    """
    path = Path(path).expanduser()
    try:
        with _on_sys_path(path.resolve().parent), _checking_modules(check_module):
            module = import_file(path)
            model = _model_of(module, path, entry)
            args, kwargs, mask_added = _inputs_of(module, path, inputs, model)
    except _CheckFailed as failed:
        raise failed.error from None
    return ModelFile(path, module, model, args, kwargs, mask_added)


class _CheckFailed(BaseException):
    """Carries check_module's error out of the user's code (a BaseException: their `except
    Exception` does not catch it) and past the wrapping of the user's own errors."""

    def __init__(self, error: SwitchHeadError):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _checking_modules(check: Callable[[torch.nn.Module], None] | None) -> Iterator[None]:
    if check is None:
        yield
        return
    checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def hook(module: torch.nn.Module, name: str, child: Any) -> None:
        if module not in checked:
            checked.add(module)
            try:
                check(module)
            except SwitchHeadError as error:
                raise _CheckFailed(error) from None
    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def load_tokenizer(loaded: ModelFile) -> Any | None:
    """The model file's tokenizer: its `tokenizer`, or what `get_tokenizer()` returns; None when it
    defines neither."""
    return _tokenizer_in(loaded.module, loaded.path)


def tokenizer_of_file(path: str | Path) -> Any | None:
    """The tokenizer of the model file at `path` (as load_tokenizer), without building its model."""
    path = Path(path).expanduser()
    with _on_sys_path(path.resolve().parent):
        module = import_file(path)
    return _tokenizer_in(module, path)


def _tokenizer_in(module: types.ModuleType, path: Path) -> Any | None:
    for name in TOKENIZER_NAMES:
        if not hasattr(module, name):
            continue
        value = getattr(module, name)
        if name == "get_tokenizer":
            if not callable(value):
                raise ModelFileError(f"{path.name}: `get_tokenizer` is a {type(value).__name__}, expected a function")
            with _on_sys_path(path.resolve().parent):
                value = _call_user(value, f"{path.name}: get_tokenizer()", path)
            name = "get_tokenizer()"
        if value is None:
            continue
        if not callable(value):
            raise ModelFileError(f"{path.name}: `{name}` is a {type(value).__name__}; a tokenizer is called as "
                                 "tokenizer(text, add_special_tokens=False) and returns {'input_ids': [...]}")
        return value
    return None


def import_file(path: Path) -> types.ModuleType:
    """Execute a Python file as a fresh module (registered in sys.modules under a private name,
    which dataclasses and pickling in the file need)."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file (expected a Python file such as model.py)")
    resolved = path.resolve()
    name = "switchhead_model_file_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        where = f"{Path(exc.filename).name if exc.filename else path.name}:{exc.lineno}"
        text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        raise ModelFileError(f"{where}: {type(exc).__name__}: {exc.msg}{text}") from None
    except (KeyboardInterrupt, GeneratorExit, _CheckFailed):
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:  # noqa: BLE001  (SystemExit from the user's file is an error too)
        sys.modules.pop(name, None)
        raise ModelFileError(f"importing {path.name} failed: {describe_exception(exc, resolved)}") from exc
    return module


def describe_exception(exc: BaseException, user_file: Path | None = None) -> str:
    """One line: where in the user's code it happened, the exception type and its first line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = user_frame(exc, user_file)
    return f"{where + ': ' if where else ''}{type(exc).__name__}{': ' + message if message else ''}"


def user_frame(exc: BaseException, user_file: Path | None = None) -> str | None:
    """'file.py:LINE (source)' of the deepest traceback frame in `user_file`; without one, of the
    deepest frame outside this package, torch and the standard library."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = Path(__file__).resolve().parent
    chosen = None
    for frame in frames:
        file = Path(frame.filename)
        if user_file is not None and file == user_file:
            chosen = frame
    if chosen is None:
        skip = (str(ours), str(Path(torch.__file__).parent), str(Path(contextlib.__file__).parent))
        outside = [f for f in frames if not f.filename.startswith(skip) and not f.filename.startswith("<")]
        chosen = outside[-1] if outside else None
    if chosen is None:
        return None
    source = f" `{chosen.line.strip()}`" if chosen.line and chosen.line.strip() else ""
    return f"{Path(chosen.filename).name}:{chosen.lineno}{source}"


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _call_user(value: Any, what: str, path: Path) -> Any:
    try:
        return value()
    except (KeyboardInterrupt, GeneratorExit, _CheckFailed):
        raise
    except BaseException as exc:  # noqa: BLE001
        raise ModelFileError(f"{what} failed: {describe_exception(exc, path.resolve())}") from exc


def _model_of(module: types.ModuleType, path: Path, entry: str | None) -> torch.nn.Module:
    names = (entry,) if entry else MODEL_NAMES
    found = [n for n in names if hasattr(module, n)]
    if not found:
        if entry:
            raise ModelFileError(f"{path.name} has no `{entry}` (given by --entry)")
        raise ModelFileError(f"{path.name} defines neither `model` (an nn.Module) nor `build_model()`; "
                             "define one or name yours with --entry NAME")
    name = found[0]
    value = getattr(module, name)
    if not isinstance(value, torch.nn.Module) and callable(value):
        value = _call_user(value, f"{path.name}: {name}()", path)
        name = f"{name}()"
    if not isinstance(value, torch.nn.Module):
        raise ModelFileError(f"{path.name}: `{name}` is a {type(value).__name__}, expected a torch.nn.Module")
    return value


def _inputs_of(module: types.ModuleType, path: Path, inputs: str | None,
               model: torch.nn.Module) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    names = (inputs,) if inputs else INPUT_NAMES
    found = [n for n in names if hasattr(module, n)]
    if not found:
        if inputs:
            raise ModelFileError(f"{path.name} has no `{inputs}` (given by --inputs)")
        try:  # the model may describe its own inputs
            return resolve_inputs(model)
        except MissingInputsError:
            raise ModelFileError(
                f"{path.name} defines no `example_inputs`: add one (a tuple of positional inputs, a dict of "
                "keyword inputs, or both as (args, kwargs)) or name yours with --inputs NAME"
            ) from None
    name = found[0]
    value = getattr(module, name)
    if callable(value) and not isinstance(value, torch.Tensor):
        value = _call_user(value, f"{path.name}: {name}()", path)
        name = f"{name}()"
    return (*split_inputs(value, f"{path.name}: `{name}`"), False)


def split_inputs(value: Any, what: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) from a tensor, a tuple of args, a dict of kwargs or an (args, kwargs) pair."""
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ModelFileError(f"{what} is a dict whose keys are not all argument names (strings)")
        return (), dict(value)
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
            return tuple(value[0]), split_inputs(value[1], what)[1]
        return value, {}
    raise ModelFileError(f"{what} is a {type(value).__name__}; expected a tuple of positional inputs, "
                         "a dict of keyword inputs, or (args, kwargs)")
