"""ifprune-mlx: instruction-following pruning on MLX.

    import ifprune_mlx as ifp
    engine = ifp.load("path/to/bundle")
    print(engine.generate("Reverse the word: pruning", max_tokens=32))
"""

from .chat import ChatSession
from .engine import Engine, load
from .resolve import open_model
from .errors import (BundleError, ConversionError, DistributedError, IFPruneError, PredictorError, PromptTooLongError,
                     SelectionError, UnsupportedArchitectureError)
from .selectors import Selection, Selector, kept_count

__version__ = "0.1.0"
__all__ = ["load", "open_model", "Engine", "Selection", "Selector", "ChatSession", "kept_count", "IFPruneError", "BundleError",
           "UnsupportedArchitectureError", "PredictorError", "SelectionError", "ConversionError", "PromptTooLongError",
           "DistributedError"]
