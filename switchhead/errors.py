"""Errors the package raises for bad input. Each message is one line that says what to do."""


class SwitchHeadError(ValueError):
    """Base class: the user's input cannot be handled as given."""


class MissingInputsError(SwitchHeadError):
    """The model cannot describe its own example inputs and none were passed."""


class CaptureError(SwitchHeadError):
    """torch.export could not capture the model (or the model failed on its inputs)."""


class NoAttentionError(SwitchHeadError):
    """No attention site was found (or none passed the filter)."""


class VerificationError(SwitchHeadError):
    """The converted model does not match the original where it must."""


class ConfigMismatchError(SwitchHeadError):
    """The config does not fit this model (e.g. a head count its attention cannot be folded to)."""
