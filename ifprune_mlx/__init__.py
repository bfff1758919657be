"""ifprune-mlx: instruction-following pruning on MLX.

    import ifprune_mlx as ifp
    engine = ifp.load("path/to/bundle")
    print(engine.generate("Reverse the word: pruning", max_tokens=32))

Importing the package is light: the engine (and mlx-lm's generation code), the chat session
and the front door that may convert models are imported on first use of their names.
"""

from importlib import import_module

from .errors import (BundleError, ConversionError, DistributedError, IFPruneError, PredictorError, PromptTooLongError,
                     SamplingError, SelectionError, UnsupportedArchitectureError)

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used
_LAZY = {"load": "engine", "Engine": "engine", "open_model": "opener", "ChatSession": "chat",
         "Selection": "selectors", "Selector": "selectors", "kept_count": "selectors"}

__all__ = ["load", "open_model", "Engine", "Selection", "Selector", "ChatSession", "kept_count", "IFPruneError", "BundleError",
           "UnsupportedArchitectureError", "PredictorError", "SelectionError", "SamplingError", "ConversionError",
           "PromptTooLongError", "DistributedError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
