"""Typed errors. Every message says what was found, what was expected and what to do."""


class IFPruneError(Exception):
    """Base class of every error ifprune-mlx raises on purpose."""


class BundleError(IFPruneError):
    """A model folder or bundle is missing, corrupt, or does not match its config."""


class UnsupportedArchitectureError(BundleError):
    """The model's architecture has no prunable FFN implementation here."""


class PredictorError(BundleError):
    """The sparsity predictor is missing, corrupt, or does not fit the LLM."""


class SelectionError(IFPruneError, ValueError):
    """A density or an explicit channel selection is invalid."""


class SamplingError(IFPruneError, ValueError):
    """A generation option is invalid: max_tokens, temperature, top_p or seed."""


class ConversionError(IFPruneError):
    """A checkpoint could not be converted to a bundle."""


class PromptTooLongError(IFPruneError, ValueError):
    """A prompt (or a conversation) does not fit in the model's context."""


class DistributedError(IFPruneError):
    """A sharded run cannot go on: a model too small to shard, a rank that failed or was lost."""


class ResidentError(IFPruneError, ValueError):
    """Resident mode (only the kept FFN rows in memory) cannot do what was asked: a density above
    its capacity, the dense model, a plain model folder, or rows that could not be read."""


class BundleChangedError(ResidentError, BundleError):
    """A bundle read by byte range while loaded changed on disk (size, time or header)."""
