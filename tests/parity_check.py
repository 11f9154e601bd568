"""The one comparison every parity test makes: quantkit's model against transformers' own on the same weights."""

import torch


def assert_matches_transformers(ref, ours, seq_len: int = 19, prompt_len: int = 6, new_tokens: int = 12) -> None:
    """fp32 logits within 1e-4 on two random sequences, and identical greedy generations (KV cache on both sides)."""
    ids = torch.randint(0, ref.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4

    prompt = ids[:1, :prompt_len]
    expected_gen = ref.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    got_gen = ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
    assert got_gen.tolist() == expected_gen.tolist()
