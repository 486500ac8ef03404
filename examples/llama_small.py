"""A small Llama from Hugging Face transformers (random weights), as a switchhead-rewrite model file.

    switchhead-rewrite examples/llama_small.py --output /tmp/llama_out

Grouped-query attention (4 query heads share 2 KV heads) with rotary position embeddings: the V
experts are per KV head, the O experts per query head. To convert a real checkpoint, return
`LlamaForCausalLM.from_pretrained(...)` from `build_model()` instead.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    use_cache=False,  # a KV cache in the output cannot be exported
)


def build_model():
    return LlamaForCausalLM(CONFIG).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, CONFIG.vocab_size, (2, 16))}
