"""User-facing errors: each names the bad value and what would work. The CLI prints one line for them."""


class FerryError(Exception):
    """Base class for mistakes a user can fix (bad path, bad option, unsupported model)."""


class ModelNotFoundError(FerryError):
    pass


class UnsupportedModelError(FerryError):
    """Architecture, tensor type or config option that Ferry cannot run."""


class InvalidRequestError(FerryError):
    """Bad sampling values, prompts longer than the context, empty prompts."""


class DeviceError(FerryError):
    """A device was asked for that this machine does not have."""
