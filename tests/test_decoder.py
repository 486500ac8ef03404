"""switchhead.decoder: converted decoder-only LMs generate exactly the original's tokens over a static
KV cache (upcycled fp32), decode steps feed one token to attention, and the cache follows V."""

from __future__ import annotations

import pytest
import torch

import switchhead
from switchhead.cache import cached_form
from switchhead.decoder import CachedLM, convert_decoder
from switchhead.generate import generate_with
from zoo_cached import CACHED_BY_NAME, CACHED_ZOO, built, padded_prompts

NEW_TOKENS = 32
EOS = 60  # a real token of the zoo's vocabularies: stopping and padding are exercised too


def original_tokens(name: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original model's own greedy generation: Hugging Face's generate (static cache) for HF
    models, else the model's eager forward over its buffers in the cached form."""
    model, _ = built(name)
    if CACHED_BY_NAME[name].hf:
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              cache_implementation="static", pad_token_id=0, eos_token_id=EOS)
    form, layout = cached_form(model, CACHED_BY_NAME[name].vocab)
    return generate_with(form, layout.allocate, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS)


@pytest.mark.parametrize("case", CACHED_ZOO, ids=lambda c: c.name)
def test_upcycled_generation_is_the_originals(case) -> None:
    _, converted = built(case.name)
    ids, mask = padded_prompts(case.vocab)
    want = original_tokens(case.name, ids, mask)
    got = converted.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS)
    assert got.shape == want.shape and torch.equal(got, want)
    assert got.shape[1] > ids.shape[1] + 4  # it did generate (not one EOS at once)


@pytest.mark.parametrize("case", CACHED_ZOO, ids=lambda c: c.name)
def test_detection_follows_v_through_the_cache(case) -> None:
    _, converted = built(case.name)
    for graph in (converted.prefill, converted.decode):
        sites = switchhead.report_of(graph).sites
        assert len(sites) == case.layers
        assert {(s["num_heads"], s["num_kv_heads"], s["head_dim"]) for s in sites} == {(case.heads, case.kv_heads, case.head_dim)}
    assert converted.layout.shapes == ((case.kv_heads, case.head_dim),) * 2 * case.layers


def tokens_into_attention(graph: torch.fx.GraphModule, *inputs) -> list[int]:
    """How many new tokens per sequence each attention core's query and each expert op's routed
    input carry in one call."""
    batch = inputs[0].shape[0]
    seen: list[int] = []

    class Counter(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.ops.aten.scaled_dot_product_attention.default:
                seen.append(args[0].shape[-2])  # query [B, H, T, dh]
            elif getattr(target, "namespace", None) == "switchhead":
                seen.append(args[0].shape[0] // batch)  # routed tokens [B * T, ...]
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Counter(graph).run(*inputs)
    return seen


@pytest.mark.parametrize("name", ["buffer_cached_decoder", "hf_llama"])
def test_decode_steps_feed_one_token_to_attention(name) -> None:
    _, converted = built(name)
    batch, prompt, length = 2, 5, 12
    cache = converted.new_cache(batch, length)
    ids = torch.randint(1, 50, (batch, prompt))
    mask = torch.ones(batch, length, dtype=torch.long)
    positions = torch.arange(prompt).expand(batch, prompt)
    prefill = tokens_into_attention(converted.prefill, ids, mask, positions, torch.arange(prompt), cache)
    decode = tokens_into_attention(converted.decode, ids[:, :1], mask, positions[:, -1:] + 1,
                                   torch.tensor([prompt]), cache)
    layers = CACHED_BY_NAME[name].layers
    assert prefill == [prompt] * len(prefill) and len(prefill) == 3 * layers  # V experts, core, O experts
    assert decode == [1] * 3 * layers


def test_the_cache_holds_the_prompt_after_prefill() -> None:
    model, converted = built("hf_llama")
    ids, mask = padded_prompts(61)
    cache = converted.new_cache(3, 10)
    full = torch.zeros(3, 10, dtype=torch.long)
    full[:, :ids.shape[1]] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    converted(ids, full, positions, torch.arange(ids.shape[1]), cache)
    written = cache[1][:, :, :ids.shape[1]]  # V of layer 0
    assert written.abs().sum(-1).gt(0).all() and not cache[1][:, :, ids.shape[1]:].any()


def test_sampling_with_top_k_1_is_greedy() -> None:
    _, converted = built("buffer_cached_decoder")
    ids, mask = padded_prompts(61)
    greedy = converted.generate(ids, mask, max_new_tokens=8)
    sampled = converted.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, sampled)
    other = converted.generate(ids, mask, max_new_tokens=8, do_sample=True, temperature=5.0,
                               generator=torch.Generator().manual_seed(3))
    assert not torch.equal(greedy, other)  # sampling at a high temperature does leave the greedy path


def test_a_model_without_a_cache_is_refused_clearly() -> None:
    from switchhead.errors import CaptureError
    from zoo import ZOO_BY_NAME

    with pytest.raises(CaptureError, match="not a cached decoder"):
        convert_decoder(ZOO_BY_NAME["nanogpt"].build())


@pytest.mark.parametrize("name", ["buffer_cached_decoder", "hf_gpt2", "hf_mistral_gqa"])
def test_save_load_round_trip_generates_identically(name, tmp_path) -> None:
    from switchhead.io import load, save

    _, converted = built(name)
    loaded = load(save(converted, tmp_path / "out"))
    assert isinstance(loaded, CachedLM) and loaded.layout == converted.layout
    assert loaded.decode.get_parameter(next(n for n, _ in loaded.prefill.named_parameters())) is \
        loaded.prefill.get_parameter(next(n for n, _ in loaded.prefill.named_parameters()))  # weights shared
    ids, mask = padded_prompts(CACHED_BY_NAME[name].vocab)
    want = converted.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS)
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS), want)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decode.graph.json", "model.graph.json",
                                                                  "model.safetensors", "report.json"]
    weight_bytes = sum(p.numel() * p.element_size() for p in converted.parameters())
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < 1.5 * weight_bytes  # stored once


# (case, config, whether to save and load it too): fewer heads (HF MHA), fewer and larger heads
# (the hand-written cache), GQA (its KV heads and cache stay)
FOLDS = [("buffer_cached_decoder", dict(init="random", num_heads=2, head_dim=16), False),
         ("hf_llama", dict(init="fold", num_heads=2), True),
         ("hf_mistral_gqa", dict(init="fold", num_heads=2), False)]


@pytest.mark.parametrize("name, options, round_trip", FOLDS,
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) if isinstance(v, dict) else "")
def test_folded_decoders_generate_over_a_smaller_cache(name, options, round_trip, tmp_path) -> None:
    case = CACHED_BY_NAME[name]
    dense = built(name)[1]
    folded = convert_decoder(case.build(), switchhead.SwitchHeadConfig(**options))
    kv_heads = min(case.kv_heads, options["num_heads"])  # GQA keeps its KV heads
    head_dim = options.get("head_dim", case.head_dim)
    assert folded.layout.shapes == ((kv_heads, head_dim),) * 2 * case.layers
    ids, mask = padded_prompts(case.vocab)
    tokens = folded.generate(ids, mask, max_new_tokens=12)
    assert tokens.shape == (3, ids.shape[1] + 12) and bool(((tokens >= 0) & (tokens < case.vocab)).all())
    logits = folded(ids, mask, torch.zeros(3, ids.shape[1], dtype=torch.long), torch.arange(ids.shape[1]),
                    folded.new_cache(3, ids.shape[1]))
    assert logits.shape == (3, ids.shape[1], case.vocab) and bool(torch.isfinite(logits).all())
    # the allocated cache holds H2 dh2 / (H dh) of the dense one's bytes, as the cost table says
    ratio = (kv_heads * head_dim) / (case.kv_heads * case.head_dim)
    allocated = [sum(t.numel() * t.element_size() for t in m.new_cache(3, 40)) for m in (dense, folded)]
    assert allocated[1] == ratio * allocated[0]
    table = str(switchhead.report_of(folded.prefill).cost_table(64))
    row = next(line for line in table.splitlines() if line.startswith("KV cache per token"))
    assert row.split()[-1] == f"{ratio:.2f}x"
    assert folded.layout.bytes_per_token() == ratio * dense.layout.bytes_per_token()
    if round_trip:  # the resized cache inputs survive saving
        from switchhead.io import load, save

        loaded = load(save(folded, tmp_path / "out"))
        assert loaded.layout == folded.layout and torch.equal(loaded.generate(ids, mask, max_new_tokens=12), tokens)


def test_groups_that_depend_on_the_example_prompts_are_refused():
    # prefill and decode are folded from different example inputs and share one set of weights
    from switchhead.errors import ConfigMismatchError
    with pytest.raises(ConfigMismatchError, match="convert_decoder needs fold_groups='consecutive'"):
        convert_decoder(CACHED_BY_NAME["hf_llama"].build(),
                        switchhead.SwitchHeadConfig(init="fold", num_heads=2, fold_groups="similar"))
