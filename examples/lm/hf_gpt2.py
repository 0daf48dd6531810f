"""Bring your own transformer: a Hugging Face GPT-2 built from a config (no download), for
`model.factory: hf_gpt2:gpt2`. Needs the optional extra `ticketsmith[lm-hf]` (transformers).

GPT-2 keeps its projections in `Conv1D` modules (weights stored (in, out)); TicketSmith prunes
them like Linear layers, and its head and MLP-unit layouts read the transposed axes. The output
head is tied to the token embedding and stays dense, as embeddings do.
"""
from __future__ import annotations


def gpt2(input_shape, num_classes, layers: int = 2, heads: int = 2, width: int = 32):
    """A GPT-2 of the given size: context = input_shape[0], vocabulary = num_classes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=num_classes, n_positions=input_shape[0], n_embd=width,
                        n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)
