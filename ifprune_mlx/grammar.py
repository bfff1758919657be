"""Structured output: JSON (any object, or one JSON schema) by constrained decoding (no HTTP).

llguidance (the optional extra `serve`) compiles the grammar and, per step, says which tokens
may come next as a bitmask; JsonConstraint is an mlx-lm logits processor that sets the logits
of every other token to -inf (mx.where), so each request of a batch keeps its own grammar. The greedy or sampled token is then always one the grammar
allows; the generation ends with the end token once the JSON value is complete (or at
max_tokens, cut short: finish_reason "length").
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import IFPruneError


# No free whitespace between tokens of the JSON: a model cannot pad it without end.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(IFPruneError, ValueError):
    """A response_format that cannot be followed (an invalid schema, a tokenizer llguidance cannot read)."""


def grammar_of(response_format: dict) -> str | None:
    """The llguidance grammar of an OpenAI response_format (None for plain text)."""
    from llguidance import LLMatcher

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format.json_schema must be an object with a `schema` object")
        return LLMatcher.grammar_from_json_schema(spec.get("schema", {}), defaults=COMPACT)
    raise GrammarError(f"response_format.type is {kind!r}; expected \"text\", \"json_object\" or \"json_schema\"")


class Grammars:
    """The llguidance tokenizer of a model (built once: about a second) and constraints from it."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import llguidance.hf
        except ImportError:
            raise GrammarError("response_format needs llguidance: pip install 'ifprune-mlx[serve]'") from None
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
        except Exception as e:  # llguidance reads fast (Rust) tokenizers only
            raise GrammarError(f"this model's tokenizer cannot drive constrained decoding ({e})") from None
        self.vocab_size = vocab_size

    def constraint(self, response_format: dict) -> "JsonConstraint | None":
        """A fresh logits processor for one request (None for plain text); GrammarError when
        the grammar does not compile."""
        from llguidance import LLMatcher

        grammar = grammar_of(response_format)
        if grammar is None:
            return None
        message = LLMatcher.validate_grammar(grammar, self.tokenizer)  # "" when it compiles
        matcher = None if message else LLMatcher(self.tokenizer, grammar, log_level=0)
        if message or matcher.is_error():
            raise GrammarError(f"response_format: the schema cannot be followed: {message or matcher.get_error()}")
        return JsonConstraint(matcher, self.vocab_size)


class JsonConstraint:
    """An mlx-lm logits processor: only tokens the grammar allows keep their logits.

    Called once per step with the tokens so far (the last one: the token just sampled, except
    on the first call, where it is the prompt's last) and the [1, vocab] logits.
    """

    def __init__(self, matcher, vocab_size: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.vocab_size, self.calls = matcher, vocab_size, 0
        self.bitmask = allocate_token_bitmask(1, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        if self.calls:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.calls += 1
        if self.matcher.is_error():  # cannot happen with masked sampling; never mask everything
            return logits
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # bit i of the little-endian int32 words is token i (NumPy unpacks it 100x faster than MLX ops here)
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: logits.shape[-1]]
        allowed = np.zeros(logits.shape[-1], dtype=bool)  # tokens past the grammar's vocabulary: never
        allowed[: bits.shape[0]] = bits
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))

