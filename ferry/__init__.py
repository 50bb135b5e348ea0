"""Ferry: distributed LLM inference whose edge is communication."""

from ferry.errors import FerryError

__all__ = ["FerryError", "LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import ferry` (and `ferry --help`) does not pay for importing torch.
    if name == "LLM":
        from ferry.api import LLM

        return LLM
    if name == "SamplingParams":
        from ferry.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
