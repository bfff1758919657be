"""The engine: load a model, select FFN channels per prompt, apply them in place, generate.

Who decides the mask: generate()/stream() select per prompt (cached per selector input)
at the bundle's default density, or at `density=` when given, with the trained predictor
where the bundle has one, else (or with `selector="activations"`) with the training-free
selector. apply(selection | indices | None) pins a selection (None pins dense) until
apply("auto"); `density=` or `selector=` on one call overrides a pin for that call only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_tokenizer

from . import bundle
from .bundle import DEFAULT_PREFILL, PAD_MULTIPLE, PLAIN_DEFAULT_DENSITY, check_prefill
from .calibrate import Calibration
from .distributed import DEFAULT_SPLIT, Sharding, all_ranks_ok
from .errors import BundleError, PromptTooLongError, ResidentError, SelectionError
from .models import prunable_mlps
from .reading import read_model
from .predictor import load_predictor
from .prune import ApplyStats, apply_selection, observing, rows_to_swap
from .budgets import LayerBudgets
from .resident import MODES as RESIDENT_MODES, Residency, residency_for
from .selectors import (PREFILL_CHUNK, ActivationSelector, PredictorSelector, Prompt, Selection, Selector,
                        check_density, check_sampling, chunks, kept_count, top_k)

AUTO = "auto"  # apply(AUTO): no pinned selection, generation selects per prompt
LOST = "lost"  # engine.applied after a resident apply failed and could not restore every row


class Engine:
    """An mlx-lm model whose FFN channels can be selected in place, plus its selectors.

    Attributes:
        model: the mlx-lm model (callable on token ids, returns logits; reflects the
            applied selection).
        tokenizer: its mlx-lm TokenizerWrapper.
        config: the model's config.json.
        selectors: name -> Selector: "predictor" (bundles with a trained predictor) and
            "activations" (training-free, every model).
        selector: the default one: the predictor where there is one, else "activations".
        prefill: what the trained predictor's calls prefill the prompt with: "pruned" (the
            paper's setting) or "dense" (all channels for the prompt, the selection for the
            answer); the bundle's "prefill", settable. The training-free selector always
            prefills dense: its scoring pass is the prefill.
        deterministic: whether kept rows are kept in channel order, so a selection computes
            the same logits bit for bit whatever was applied before (costs up to two row
            copies per kept channel per apply instead of one per changed channel).
        sharding: None in one process; under mlx.distributed, how the FFN channels are split
            over the ranks (ifprune_mlx.distributed). Selections (`applied` included) are
            always global, in original channel ids; each rank applies its part.
        residency: None, or resident mode (load(resident="kept"), ifprune_mlx.resident): each
            layer holds `residency.capacity` FFN rows and applies read the rows that enter.
    """

    def __init__(self, model: nn.Module, tokenizer, config: dict, selector_tokenizer=None,
                 predictor=None, default_density: float | None = None, pad_multiple: int = PAD_MULTIPLE,
                 cache_size: int = 64, path: Path | None = None, deterministic: bool = True,
                 sharding: Sharding | None = None, residency: Residency | None = None,
                 prefill: str = DEFAULT_PREFILL):
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.prefill = check_prefill(prefill)
        self.deterministic, self.sharding, self.residency = deterministic, sharding, residency
        self.mlps = prunable_mlps(model)
        self.n_layers = len(self.mlps)
        self.d_ffn = sharding.d_ffn if sharding else self.mlps[0].d_ffn
        self.selectors: dict[str, Selector] = {}
        if predictor is not None:
            self.selectors["predictor"] = PredictorSelector(predictor, selector_tokenizer or tokenizer)
        self.selectors["activations"] = ActivationSelector(model, self.mlps, self.prompt_tokens)
        self.selector: Selector = next(iter(self.selectors.values()))
        self._set_default_density(default_density or PLAIN_DEFAULT_DENSITY)
        self.calibration: Calibration | None = None  # how the default density was chosen, if it was
        self.budgets: LayerBudgets | None = None  # per-layer kept counts, used when .enabled
        self._counts: dict[float, tuple[int, ...]] = {}
        self.pad_multiple = pad_multiple
        self._cache: OrderedDict[tuple, Selection] = OrderedDict()
        self._cache_size = cache_size
        # What apply() pinned: a Selection, None (dense), or AUTO (nothing: select per prompt).
        self._pin: Selection | None | str = AUTO
        self.applied: Selection | None = None  # what the model computes with now (None: dense)
        self.last_apply = ApplyStats([0] * self.n_layers)
        if residency is not None:
            self._start_resident()

    def _set_default_density(self, density: float) -> None:
        """The one rule for the default density: as given; in resident mode at most what the
        capacity holds."""
        self.default_density = density if self.residency is None else min(density, self.residency.max_density)

    def _start_resident(self) -> None:
        """Resident mode: the model computes on the first kept_count() channels (load read the
        first `capacity`) until an apply."""
        self.applied = self.residency.start(self.mlps, self.kept_count())

    def use_calibration(self, calibration: Calibration) -> None:
        """Make a calibration's chosen density the default, and its per-layer budgets (if it
        has them, checked against this model) the engine's (ifprune_mlx.calibrate); in resident
        mode at most the capacity's."""
        budgets = None
        if calibration.layer_budgets is not None:
            budgets = LayerBudgets.from_json(calibration.layer_budgets, self.n_layers, self.d_ffn,
                                             f"{self.path or 'calibration'}: calibration")
        self.calibration, self.budgets = calibration, budgets
        self._set_default_density(calibration.density)
        self._counts.clear()

    # -- selection ---------------------------------------------------------------------

    def get_selector(self, selector: str | Selector | None = None) -> Selector:
        """The selector called `selector` (None: the default; a Selector object is returned as is)."""
        if selector is None:
            return self.selector
        if not isinstance(selector, str):
            return selector
        if selector not in self.selectors:
            if selector == "predictor":
                raise SelectionError(
                    "this model has no trained predictor (it is a plain model folder or a bundle "
                    "without one); use the training-free selector: selector=\"activations\"")
            raise SelectionError(f"unknown selector {selector!r}; this model has: {', '.join(self.selectors)}")
        return self.selectors[selector]

    def kept_count(self, density: float | None = None) -> int:
        """Channels kept per layer at `density` (default: the bundle's) under uniform budgets
        (with per-layer budgets: their mean)."""
        density = self.default_density if density is None else density
        k = kept_count(density, self.d_ffn, self.pad_multiple)
        if self.residency is not None and k > self.residency.capacity:
            self.residency.check_counts([k], f"density {check_density(density):.2f}")
        return k

    def kept_counts(self, density: float | None = None) -> tuple[int, ...]:
        """Channels kept in each layer at `density` (default: the bundle's): the per-layer
        budgets' allocation where they are enabled (ifprune_mlx.budgets), else uniform."""
        density = check_density(self.default_density if density is None else density)
        if self.budgets is None or not self.budgets.enabled:
            return (self.kept_count(density),) * self.n_layers
        if density not in self._counts:
            counts = tuple(self.budgets.counts(density, self.d_ffn))
            if self.residency is not None:
                self.residency.check_counts(counts, f"density {density:.2f} (per-layer budgets)")
            self._counts[density] = counts
        return self._counts[density]

    def select(self, prompt: Prompt, density: float | None = None,
               selector: str | Selector | None = None) -> Selection:
        """The channels to keep for `prompt` at `density` (default: the bundle's).

        selector: "predictor" (the default where the bundle has one), "activations" (the
        training-free selector) or a Selector object. Results are cached per (selector,
        its input tokens, kept count): a task prompt selected once is free the next time.
        """
        selector = self.get_selector(selector)
        return self._select(selector, selector.inputs(prompt), self.kept_counts(density))

    def select_densities(self, prompt: Prompt, densities: Sequence[float],
                         selector: str | Selector | None = None) -> list[Selection]:
        """select() at several densities from one scoring pass (calibration, studies)."""
        selector = self.get_selector(selector)
        return self._select_many(selector, selector.inputs(prompt), [self.kept_counts(d) for d in densities])

    def _select(self, selector: Selector, tokens: list[int], k, kv_cache: list | None = None) -> Selection:
        """Select by `selector` on `tokens` (cached). With kv_cache (activations only) the
        scoring pass always runs, filling the cache: GRIFFIN's dense prefill."""
        return self._select_many(selector, tokens, [k], kv_cache)[0]

    def _select_many(self, selector: Selector, tokens: list[int], ks: list,
                     kv_cache: list | None = None) -> list[Selection]:
        """Selections at several kept counts (each an int for every layer, or one per layer)
        from one scoring pass, cached."""
        ks = [(int(k),) * self.n_layers if np.isscalar(k) else tuple(int(c) for c in k) for k in ks]
        keys = [(selector, tuple(tokens), k) for k in ks]
        if kv_cache is None and all(key in self._cache for key in keys):
            for key in keys:
                self._cache.move_to_end(key)
            return [self._cache[key] for key in keys]
        start = time.perf_counter()
        scores = self.scores(selector, tokens, kv_cache)
        selections = self.selections(scores, ks, selector.name, time.perf_counter() - start)
        for key, selection in zip(keys, selections):
            self._cache[key] = selection
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return selections

    def scores(self, selector: Selector, tokens: list[int], kv_cache: list | None = None) -> np.ndarray:
        """[n_layers, d_ffn] channel scores of `selector` on its input `tokens` (not cached);
        with kv_cache (activations only) its dense pass fills the cache (GRIFFIN's prefill)."""
        def score():
            return selector.scores(tokens) if kv_cache is None else selector.scores(tokens, kv_cache)

        if self.sharding is None:
            scores = np.asarray(score())
        else:  # every rank must keep the same channels
            scores = self.sharding.agree(score, from_shards=isinstance(selector, ActivationSelector))
        if scores.shape != (self.n_layers, self.d_ffn):
            raise SelectionError(f"selector {selector.name!r} returned scores of shape {scores.shape}, "
                                 f"expected ({self.n_layers}, {self.d_ffn})")
        return scores

    def selections(self, scores: np.ndarray, ks: Sequence[Sequence[int]], source: str = "explicit",
                   seconds: float = 0.0) -> list[Selection]:
        """The top ks[i][layer] channels of every layer by `scores`, for each kept-count vector in ks."""
        rule = top_k if self.sharding is None else self.sharding.top_k
        return [Selection(indices=tuple(rule(scores, list(k))), d_ffn=self.d_ffn, seconds=seconds,
                          source=source) for k in ks]

    def apply(self, selection: Selection | Sequence[Sequence[int]] | None | str) -> ApplyStats:
        """Pin a selection (a Selection, per-layer index arrays, or None for dense).

        apply("auto") unpins: later calls select per prompt again. The rows are swapped
        in place; on failure the previous selection stays applied and an error is raised.
        """
        if isinstance(selection, str):
            if selection != AUTO:
                raise SelectionError(f"apply() takes a Selection, index arrays, None or \"auto\"; got {selection!r}")
            self._pin = AUTO
            return ApplyStats([0] * self.n_layers)
        if selection is not None and not isinstance(selection, Selection):
            selection = Selection.from_indices(selection, self.d_ffn, self.n_layers)
        if selection is not None and selection.d_ffn != self.d_ffn:
            raise SelectionError(f"selection is for d_ffn={selection.d_ffn}, the model has {self.d_ffn}")
        stats = self._apply(selection)
        self._pin = selection
        return stats

    def _apply(self, selection: Selection | None) -> ApplyStats:
        if selection is self.applied:
            return ApplyStats([0] * self.n_layers)
        keep = None if selection is None else list(selection.indices)
        if self.residency is not None:
            self.last_apply = self._apply_resident(keep)
            self.applied = selection
            return self.last_apply
        if keep is not None and self.sharding is not None:
            keep = self.sharding.local(keep)
        self.last_apply = apply_selection(self.mlps, keep, canonical=self.deterministic)
        self.applied = selection
        return self.last_apply

    def _apply_resident(self, keep: list[np.ndarray] | None) -> ApplyStats:
        """Resident mode's apply (resident.Residency.apply)."""
        try:
            return self.residency.apply(self.mlps, keep)
        except BaseException:
            if not self.residency.intact(self.mlps):
                self.applied = LOST  # some rows are unknown: the next apply reads them, whatever it is
            raise

    def swap_cost(self, selection: Selection | None) -> int:
        """Rows apply(selection) would swap now (None: dense); nothing moves."""
        if selection is self.applied:
            return 0
        if self.residency is not None:  # what an apply costs here is the rows it reads
            return self.residency.rows_to_read(self.mlps, None if selection is None else list(selection.indices))
        return rows_to_swap(self.mlps, None if selection is None else list(selection.indices),
                            canonical=self.deterministic)

    def _uses_pin(self, density: float | None, selector) -> bool:
        """Whether a call with these overrides computes with the pinned selection."""
        return self._pin is not AUTO and density is None and selector is None

    def prepare(self, prompt: Prompt, density: float | None = None,
                selector: str | Selector | None = None) -> Selection | None:
        """Apply the selection a generation call on `prompt` uses, and return it."""
        if self._uses_pin(density, selector):
            target = self._pin
        else:
            target = self.select(prompt, density, selector)
        self._apply(target)
        return target

    # -- generation --------------------------------------------------------------------

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (a string or chat messages), chat template applied if any."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode("\n".join(m["content"] for m in messages))

    def stream_responses(self, prompt: Prompt, *, max_tokens: int = 256, density: float | None = None,
                         temp: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                         selector: str | Selector | None = None, prefill: str | None = None,
                         prompt_cache: list | None = None, tokens: list[int] | None = None
                         ) -> Iterator[GenerationResponse]:
        """Select, apply and generate; yields mlx-lm GenerationResponses as tokens come.

        Args:
            prompt: the user's text, or chat messages [{"role", "content"}, ...].
            max_tokens: most tokens to generate.
            density: fraction of FFN channels to keep for this call (default: the pin, or
                the bundle's default density).
            temp, top_p: sampling (temp 0 is greedy).
            seed: seed of the sampler, for reproducible sampling.
            selector: "predictor", "activations" or a Selector (default: the engine's).
                With "activations" the prompt is prefilled by the dense model, whose pass
                also scores the channels (GRIFFIN); only generation runs pruned.
            prefill: "dense" or "pruned": what the prompt is prefilled with (default: the
                engine's `prefill` for the trained predictor, dense for "activations",
                pruned for a pinned selection). The answer always runs on the selection.
            prompt_cache: an mlx-lm KV cache to extend (it must match the applied mask).
            tokens: the token ids to feed instead of the templated prompt: with prompt_cache,
                those after the cached prefix; without, the whole prompt (e.g. raw text for
                a completion, no chat template; GRIFFIN's dense prefill then scores these
                tokens). The trained predictor selects from `prompt` either way.
        """
        check_sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
        ids = self.prompt_tokens(prompt) if tokens is None else list(tokens)
        if self.context_length:
            used = len(ids) + (getattr(prompt_cache[0], "offset", 0) if prompt_cache else 0)
            if used >= self.context_length:
                raise PromptTooLongError(f"the prompt is {used} tokens, this model's context is "
                                         f"{self.context_length}; shorten it (in chat: /reset)")
            max_tokens = min(max_tokens, self.context_length - used)
        dense = self._prefills_dense(density, selector) if prefill is None else check_prefill(prefill) == "dense"
        prefilled = None
        if dense and prompt_cache is None and not self._uses_pin(density, selector):
            prefilled = self.prefill_dense(prompt, ids, density, selector)
        if prefilled is None:
            self.prepare(prompt, density, selector)
            if dense and len(ids) > 1:  # onto the caller's cache, or under a pin: no selection to make
                prompt_cache = prompt_cache if prompt_cache is not None else make_prompt_cache(self.model)
                start = time.perf_counter()
                self.dense_pass(ids[:-1], prompt_cache)
                prefilled = prompt_cache, time.perf_counter() - start
        if prefilled is not None:
            prompt_cache, dense_seconds = prefilled
        if seed is not None:
            mx.random.seed(seed)
        feed = ids if prefilled is None else ids[-1:]
        responses = stream_generate(
            self.model, self.tokenizer, mx.array(feed, dtype=mx.int32), max_tokens=max_tokens,
            sampler=make_sampler(temp=temp, top_p=top_p), prompt_cache=prompt_cache,
        )
        if self.sharding is not None:
            responses = self.sharding.guarded(responses)
        for response in responses:
            if prefilled is not None:  # report the whole prompt's prefill, the dense part included
                seconds = dense_seconds + response.prompt_tokens / max(response.prompt_tps, 1e-9)
                response = replace(response, prompt_tokens=len(ids), prompt_tps=len(ids) / seconds)
            yield response

    def set_prefill(self, prefill: str | None) -> None:
        """What the trained predictor's prompts prefill with from now on, "pruned" or "dense";
        None keeps the current setting (the bundle's unless changed)."""
        if prefill is not None:
            self.prefill = check_prefill(prefill)

    def prefills_dense(self, selector: str | Selector | None = None, prefill: str | None = None) -> bool:
        """Whether a call that selects with `selector` (default: the engine's) prefills the
        prompt dense: always for the training-free selector, for the others when `prefill`
        (default: the engine's) is "dense"."""
        return isinstance(self.get_selector(selector), ActivationSelector) or (prefill or self.prefill) == "dense"

    def _prefills_dense(self, density: float | None, selector: str | Selector | None) -> bool:
        """prefills_dense() for a call with these overrides; a pinned selection prefills pruned."""
        return not self._uses_pin(density, selector) and self.prefills_dense(selector)

    def prefill_dense(self, prompt: Prompt, ids: list[int], density: float | None = None,
                      selector: str | Selector | None = None) -> tuple[list, float] | None:
        """Prefill all but the last of the prompt's token ids with the dense model, then apply
        the prompt's selection for the answer. With the training-free selector that dense pass
        also scores the channels (GRIFFIN, Dong et al. 2024); the trained predictor selects
        from `prompt` first and the pass runs under its selection with all channels on (no
        row moves). The last token is fed, pruned, for the first token's logits
        (stream_responses does this when the call prefills dense).

        Returns (KV cache, seconds of selection and dense pass, the apply's not counted:
        engine.last_apply has them), or None where that cannot be done (a one-token prompt;
        the training-free selector with a cache it cannot trim).
        """
        chosen = self.get_selector(selector)
        if len(ids) < 2:
            return None
        start = time.perf_counter()
        cache = make_prompt_cache(self.model)
        if isinstance(chosen, ActivationSelector):
            if not can_trim_prompt_cache(cache):
                return None
            selection = self._select(chosen, ids, self.kept_counts(density), kv_cache=cache)
            trim_prompt_cache(cache, 1)
            applied = self._apply(selection)
        else:  # applied first: the dense pass sums the channels in the order this selection leaves
            applied = self._apply(self.select(prompt, density, chosen))
            self.dense_pass(ids[:-1], cache)
        return cache, time.perf_counter() - start - applied.seconds

    def dense_pass(self, tokens: Sequence[int], cache: list) -> None:
        """Feed `tokens` through the model with every FFN channel on, into `cache` (the KV
        cache of what precedes them), leaving the applied selection as it was."""
        with observing(self.mlps, None):
            for chunk in chunks(tokens, PREFILL_CHUNK):
                self.model(mx.array(chunk, dtype=mx.int32)[None], cache=cache)
                mx.eval([c.state for c in cache])

    def stream(self, prompt: Prompt, **options) -> Iterator[str]:
        """Like generate(), but yields text pieces as they are decoded."""
        for response in self.stream_responses(prompt, **options):
            yield response.text

    def generate(self, prompt: Prompt, **options) -> str:
        """Select channels for the prompt, apply them and return the generated text.

        Options are those of stream_responses(): max_tokens, density, selector, temp, top_p, seed.
        """
        return "".join(self.stream(prompt, **options))

    # -- facts -------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model was trained for (config's max_position_embeddings)."""
        return self.config.get("max_position_embeddings")

    @property
    def has_predictor(self) -> bool:
        return "predictor" in self.selectors

    def weight_bytes(self) -> int:
        """Bytes of the LLM's parameters (the predictor's not included)."""
        return sum(v.nbytes for _, v in nn.utils.tree_flatten(self.model.parameters()))

    def save(self, out: Path, *, force: bool = False) -> Path:
        """Write this model (dense, original channel order) and its tokenizer as a bundle."""
        if self.sharding is not None:
            raise BundleError("this engine holds one rank's share of the FFN; save from a single-process load")
        if self.residency is not None:
            raise BundleError("this engine holds only its kept FFN rows (resident mode); save from a load without resident")
        if self.has_predictor:
            raise BundleError("saving an engine with a predictor is the converter's job (ifprune convert)")
        if self.path is None:
            raise BundleError("this engine was not loaded from a folder; its tokenizer files are unknown")
        weights = {}
        for name, value in nn.utils.tree_flatten(self.model.parameters()):
            if ".mlp." in name and not name.endswith("down_proj.bias"):
                layer = int(name.split(".layers.")[1].split(".")[0])
                value = value[mx.array(np.argsort(self.mlps[layer].perm).astype(np.int32))]
            weights[name] = value
        config = {k: v for k, v in self.config.items() if k != "ifpruning"}
        return bundle.write_bundle(out, config=config, weights=weights, tokenizer_dir=self.path,
                                   default_density=self.default_density,
                                   pad_multiple=self.pad_multiple, force=force)


def load(path: str | Path, *, cache_size: int = 64, deterministic: bool = True,
         on_progress: Callable[[int, int], None] | None = None,
         group: mx.distributed.Group | None = None, split: str = DEFAULT_SPLIT,
         resident: str | None = None, max_density: float | None = None) -> Engine:
    """Load a bundle, or a plain mlx-lm / Hugging Face float model folder, as an Engine.

    Args:
        path: the folder.
        cache_size: how many selections to keep (LRU, keyed by prompt and density).
        deterministic: keep kept rows in channel order, so the same prompt and density give
            the same text whatever ran before (False: cheaper applies, order follows history).
        on_progress: called as on_progress(done, total) while the LLM's layers load.
        group: an mlx.distributed group of several ranks (e.g. mx.distributed.init() under
            mlx.launch): each rank loads 1/N of every layer's FFN channels and runs its part;
            every rank must make the same calls (docs/DISTRIBUTED.md). None: one process.
        split: under a group, how scores become the kept channels: "global" (the same top-k
            as one process) or "balanced" (top-k/N within each rank's channels).
        resident: "kept": hold only the kept FFN rows, read from the bundle when a selection
            changes (ifprune_mlx.resident; bundles only). None: the whole model in memory.
        max_density: resident mode's capacity: the highest density it can apply (default: the
            bundle's default density).
    """
    if resident is None and max_density is not None:
        raise ResidentError("max_density sets resident mode's capacity; pass resident=\"kept\" with it")
    if resident is not None and resident not in RESIDENT_MODES:
        raise ResidentError(f"resident must be one of {', '.join(RESIDENT_MODES)} (or None), got {resident!r}")
    if group is not None and group.size() > 1:
        if resident is not None:
            raise ResidentError("resident mode runs in one process; it cannot be combined with a distributed group")
        return _load_sharded(path, group, split, cache_size=cache_size, deterministic=deterministic,
                             on_progress=on_progress)
    folder = Path(path).expanduser()
    config = bundle.read_config(folder)
    block = bundle.ifpruning_block(config, folder)
    residency = None if resident is None else residency_for(folder, config, block, max_density)
    model = read_model(folder, config, block is not None, on_progress, residency=residency)
    return _engine(folder, config, block, model, cache_size=cache_size, deterministic=deterministic,
                   residency=residency)


def _load_sharded(path: str | Path, group: mx.distributed.Group, split: str, **options) -> Engine:
    """load() on one rank of `group`; a rank that fails makes every rank raise (all_ranks_ok)."""
    engine = error = None
    try:
        folder = Path(path).expanduser()
        config = bundle.read_config(folder)
        block = bundle.ifpruning_block(config, folder)
        sharding = Sharding(group, int(config["intermediate_size"]), split,
                            (block or {}).get("pad_multiple", PAD_MULTIPLE))
        model = read_model(folder, config, block is not None, options.pop("on_progress"), sharding)
        engine = _engine(folder, config, block, model, sharding=sharding, **options)
    except Exception as e:  # every rank must hear of it before any raises
        error = e
    all_ranks_ok(group, error)
    return engine


def _engine(folder: Path, config: dict, block: dict | None, model: nn.Module, **options) -> Engine:
    """The Engine of a loaded LLM: tokenizer, predictor, the bundle's settings."""
    block = block or {}
    try:
        tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise BundleError(f"{folder}: cannot load the tokenizer ({e}); copy its tokenizer files into the folder") from e
    mlps = prunable_mlps(model)
    predictor = selector_tokenizer = None
    if block.get("predictor"):
        pdir = folder / block["predictor"]
        sharding = options.get("sharding")
        predictor = load_predictor(pdir, len(mlps), sharding.d_ffn if sharding else mlps[0].d_ffn, llm=model)
        if (pdir / "tokenizer_config.json").is_file() or (pdir / "tokenizer.json").is_file():
            selector_tokenizer = load_tokenizer(pdir)
    engine = Engine(model, tokenizer, config, selector_tokenizer, predictor,
                    default_density=block.get("default_density"),
                    pad_multiple=block.get("pad_multiple", PAD_MULTIPLE), prefill=block.get("prefill", DEFAULT_PREFILL),
                    path=folder, **options)
    if block.get("calibration"):
        engine.use_calibration(Calibration.from_json(block["calibration"]))
    return engine
