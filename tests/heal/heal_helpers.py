"""Helpers of the healing tests."""

import torch


class CharTokenizer:
    """A stand-in for an HF tokenizer: one id per character."""

    eos_token_id, sep_token_id = 0, None

    def __call__(self, texts, add_special_tokens=True, padding=False, truncation=False, max_length=None,
                 return_tensors=None):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 97 + 1 for c in texts]}
        ids = [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}
