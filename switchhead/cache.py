"""The cached form of a decoder-only LM: one call signature over an explicit static KV cache.

Every cached decoder is captured as

    forward(input_ids [B, T], attention_mask [B, S], position_ids [B, T], cache_position [T],
            past_key_values: list of [B, heads, S, head_dim]) -> logits [B, T, vocab]

where S is the cache length (the prompt plus every token to generate), `attention_mask` covers the
cache slots (1: a real token; left padding is 0) and the graph writes the new tokens' K/V into the
cache tensors in place, at `cache_position`. The cache tensors are inputs, so their batch and length
stay dynamic and the converted graphs take a cache of the converted head count / size.

Two kinds of model take this form, found by what they are, not by name:
- a Hugging Face causal LM (its forward takes `past_key_values`): its own `StaticCache`, with the
  layers' tensors replaced by the inputs;
- a model whose forward(input_ids, attention_mask, position_ids, cache_position) keeps K/V in
  buffers [B, heads, S, head_dim] it writes in place (index_copy_, index assignment): the buffers
  it writes during a call are the cache, swapped for the inputs with torch.func.functional_call.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from switchhead.errors import CaptureError

CACHE_SIGNATURE = ("input_ids", "attention_mask", "position_ids", "cache_position")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes of a cached decoder's KV cache: (heads, head_dim) of each cache tensor, in input order."""

    shapes: tuple[tuple[int, int], ...]
    dtype: torch.dtype = torch.float32

    def allocate(self, batch: int, length: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zeroed cache tensors [batch, heads, length, head_dim]."""
        return [torch.zeros(batch, h, length, d, dtype=self.dtype, device=device) for h, d in self.shapes]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes, over all layers (K and V)."""
        return sum(h * d for h, d in self.shapes) * torch.empty((), dtype=self.dtype).element_size()

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": [list(s) for s in self.shapes], "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheLayout":
        return cls(tuple((int(h), int(d)) for h, d in data["shapes"]), getattr(torch, data["dtype"]))


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    return (any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
            and callable(getattr(model, "can_generate", None)) and model.can_generate())


class HFStaticCacheLM(torch.nn.Module):
    """A Hugging Face causal LM in the cached form, over a `StaticCache` built on the input tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, cache_position, past_key_values):
        from transformers import StaticCache

        cache = StaticCache(self.model.config, max_cache_len=past_key_values[0].shape[2])
        if 2 * len(cache.layers) != len(past_key_values):
            raise CaptureError(f"the model has {len(cache.layers)} cache layers, got {len(past_key_values)} tensors")
        for layer, keys, values in zip(cache.layers, past_key_values[0::2], past_key_values[1::2]):
            layer.keys, layer.values = keys, values
            layer.device, (layer.batch_size, layer.num_heads) = keys.device, keys.shape[:2]
            layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
            # the write position; a copy, as the layer advances it in place
            layer.cumulative_length = cache_position[0].clone()
            layer.is_initialized = True
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache_position=cache_position, use_cache=True, **{cache_argument(self.model): cache})
        return out.logits


class BufferCacheLM(torch.nn.Module):
    """A model keeping K/V in buffers, in the cached form: the buffers `names` become inputs."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, input_ids, attention_mask, position_ids, cache_position, past_key_values):
        buffers = dict(zip(self.names, past_key_values))
        return torch.func.functional_call(self.model, buffers, (input_ids, attention_mask, position_ids, cache_position),
                                          strict=False)


def prompt_inputs(batch: int, prompt: int, length: int, vocab: int, layout: CacheLayout,
                  generator: torch.Generator | None = None) -> tuple[Any, ...]:
    """Example inputs of the cached form: a batch of unpadded random prompts, an empty cache."""
    ids = torch.randint(0, vocab, (batch, prompt), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    positions = torch.arange(prompt).expand(batch, prompt).contiguous()
    return ids, mask, positions, torch.arange(prompt), layout.allocate(batch, length)


def cached_form(model: torch.nn.Module, vocab: int) -> tuple[torch.nn.Module, CacheLayout]:
    """`model` in the cached form, and its cache layout (read off one small call)."""
    if is_hf_causal_lm(model):
        return _hf_form(model)
    parameters = list(inspect.signature(model.forward).parameters)
    if tuple(parameters[:4]) != CACHE_SIGNATURE:
        raise CaptureError(f"{type(model).__name__} is not a cached decoder: its forward must take "
                           f"({', '.join(CACHE_SIGNATURE)}) and keep K/V in buffers, or be a Hugging Face causal LM")
    buffers = dict(model.named_buffers())
    before = {name: b._version for name, b in buffers.items()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        length = next((b.shape[2] for b in buffers.values() if b.dim() == 4), 4)
        model(ids, torch.ones(1, length, dtype=torch.long, device=device), torch.arange(2, device=device).view(1, 2),
              torch.arange(2, device=device))
    written = [name for name, b in buffers.items() if b._version != before[name]]  # in-place writes bump it
    if not written or any(buffers[n].dim() != 4 for n in written):
        raise CaptureError(f"{type(model).__name__} writes no [batch, heads, length, head_dim] cache buffers in place "
                           f"(written: {written or 'none'}): keep K/V in buffers updated with index_copy_ or index assignment")
    for name in written:
        buffers[name].zero_()
    layout = CacheLayout(tuple((buffers[n].shape[1], buffers[n].shape[3]) for n in written), buffers[written[0]].dtype)
    return BufferCacheLM(model, written), layout


def cache_argument(model: torch.nn.Module) -> str:
    """The name a HF model's forward takes its cache by: `cache` (transformers >= 5.25), else
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hf_form(model: torch.nn.Module) -> tuple[torch.nn.Module, CacheLayout]:
    from transformers import StaticCache

    cache = StaticCache(model.config, max_cache_len=4)
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, cache_position=torch.arange(2, device=ids.device), **{cache_argument(model): cache})
    shapes = []
    for layer in cache.layers:
        shapes += [(layer.keys.shape[1], layer.keys.shape[3]), (layer.values.shape[1], layer.values.shape[3])]
    return HFStaticCacheLM(model), CacheLayout(tuple(shapes), cache.layers[0].keys.dtype)
