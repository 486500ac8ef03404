"""Converting a decoder-only LM for generation: a prefill graph and a one-token decode graph over a
static KV cache (switchhead.cache), sharing their weights, with `generate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from switchhead.api import FilterFn, convert
from switchhead.cache import CacheLayout, cached_form, prompt_inputs
from switchhead.config import SwitchHeadConfig
from switchhead.errors import CaptureError, ConfigMismatchError, SwitchHeadError
from switchhead.generate import generate_with
from switchhead.inputs import example_inputs

EXAMPLE = (2, 6, 16)  # batch, prompt length, cache length of the capture's example


class CachedLM(torch.nn.Module):
    """A converted decoder-only LM: `prefill` (any number of new tokens) and `decode` (one new token)
    GraphModules in the cached form, sharing their parameters; `layout` is their KV cache."""

    def __init__(self, prefill: torch.fx.GraphModule, decode: torch.fx.GraphModule, layout: CacheLayout):
        super().__init__()
        self.prefill, self.decode, self.layout = prefill, decode, layout

    def new_cache(self, batch: int, length: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """An empty KV cache for `batch` sequences of up to `length` tokens, in the dtype of the
        model's weights (a model cast to bf16 caches bf16)."""
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), self.layout.dtype)
        device = device if device is not None else self.device
        return dataclasses.replace(self.layout, dtype=dtype).allocate(batch, length, device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor, past_key_values: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, T, V] of the new tokens; their K/V are written into `past_key_values` in place."""
        graph = self.decode if input_ids.shape[1] == 1 else self.prefill
        return graph(input_ids, attention_mask, position_ids, cache_position, list(past_key_values))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None,
                 streamer: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """Prompt plus generated token ids [B, L + n], as Hugging Face's `generate` returns them
        (switchhead.generate.generate_with; no top-k / top-p filtering unless asked for)."""
        return generate_with(self, self.new_cache, input_ids.to(self.device), attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             generator=generator, streamer=streamer)


def vocab_size_of(model: torch.nn.Module) -> int:
    """The vocabulary size: a HF config's, the model's `vocab_size`, or its input embedding's rows."""
    for owner in (getattr(model, "config", None), model):
        size = getattr(owner, "vocab_size", None)
        if isinstance(size, int):
            return size
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not embeddings:
        raise CaptureError(f"cannot tell the vocabulary size of {type(model).__name__}: give it a `vocab_size` attribute")
    return embeddings[0].num_embeddings


def dynamic_shapes(count: int, prompt: bool) -> dict[str, Any]:
    """Batch and cache length dynamic; the new tokens too in the prefill graph (1 in decode)."""
    tokens = {0: Dim.AUTO, 1: Dim.AUTO} if prompt else {0: Dim.AUTO}
    return {"input_ids": tokens, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}, "position_ids": tokens,
            "cache_position": {0: Dim.AUTO} if prompt else None,
            "past_key_values": [{0: Dim.AUTO, 2: Dim.AUTO} for _ in range(count)]}


def convert_decoder(model: torch.nn.Module, config: SwitchHeadConfig | None = None, *,
                    filter_fn: FilterFn | None = None,
                    progress: Callable[[str], None] | None = None) -> CachedLM:
    """Rewrite a decoder-only LM (a Hugging Face causal LM, or a model keeping K/V in buffers: see
    switchhead.cache) into SwitchHead attention for generation: returns a CachedLM whose prefill and
    decode graphs are each converted (and, with init="upcycle", verified) like `convert`'s result."""
    config = config or SwitchHeadConfig()
    if config.fold_groups != "consecutive":
        # the prefill and decode graphs are folded from different example inputs and share one set
        # of weights: data-dependent groups could differ between them
        raise ConfigMismatchError(f"convert_decoder needs fold_groups='consecutive' (got {config.fold_groups!r}): its "
                                  "prefill and decode graphs must fold the same heads together")
    form, layout, prefill_args, decode_args = cached_examples(model)
    count = len(layout.shapes)
    prefill = convert(form, prefill_args, config=config, filter_fn=filter_fn,
                      progress=progress, dynamic_shapes=dynamic_shapes(count, True))
    decode = convert(form, decode_args, config=config, filter_fn=filter_fn, progress=progress,
                     dynamic_shapes=dynamic_shapes(count, False))
    share_tensors(decode, prefill)
    # the cache the converted graphs take: folding resized the example caches to the new heads
    caches = [example_inputs(graph)[0][4] for graph in (prefill, decode)]
    shapes = [tuple((t.shape[1], t.shape[3]) for t in cache) for cache in caches]
    if shapes[0] != shapes[1]:
        raise SwitchHeadError(f"the prefill and decode graphs were folded to different caches {shapes}; please report this model")
    return CachedLM(prefill, decode, CacheLayout(shapes[0], layout.dtype))


def cached_examples(model: torch.nn.Module) -> tuple[torch.nn.Module, CacheLayout, tuple[Any, ...], tuple[Any, ...]]:
    """(the model in the cached form, its cache layout, example prefill inputs, example decode
    inputs) on the model's device: a batch of prompts into an empty cache, and the next token."""
    form, layout = cached_form(model, vocab_size_of(model))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch, prompt, length = EXAMPLE
    generator = torch.Generator().manual_seed(0)
    prefill = tuple(pytree.tree_map(lambda t: t.to(device), prompt_inputs(batch, prompt, length, vocab_size_of(model),
                                                                           layout, generator)))
    ids, mask, positions = prefill[:3]
    decode = (ids[:, :1], mask, positions[:, -1:] + 1, torch.tensor([prompt], device=device),
              layout.allocate(batch, length, device))
    return form, layout, prefill, decode


def share_tensors(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Make `target` use `source`'s parameters and buffers (the same names, the same shapes)."""
    own = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    theirs = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    if set(own) != set(theirs) or any(own[n].shape != theirs[n].shape for n in own):
        raise SwitchHeadError("the prefill and decode graphs were converted with different parameters; please report this model")
    for name, value in own.items():
        path, _, leaf = name.rpartition(".")
        module = target.get_submodule(path) if path else target
        if isinstance(value, torch.nn.Parameter):
            module.register_parameter(leaf, value)
        else:
            setattr(module, leaf, value)
