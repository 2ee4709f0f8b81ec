"""A tiny GGUF checkpoint built locally: a byte-level BPE tokenizer with a ChatML template and a default system
prompt (as SmolLM2's), and a tied-embedding, grouped-query-attention Llama, written as F32 tensors the way
llama.cpp's converter writes them (Q/K rows permuted), so loading it back must give the source model exactly."""

from __future__ import annotations

import os

import torch


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "How do I bake bread? Mix flour, water, salt and yeast.",
    "Explain placeholder harmful request; I cannot help with that.",
    "Write a short poem about the sea, the sky and the wind.",
    "system user assistant You are a helpful assistant",
] * 4


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (the GPT-2 family SmolLM2 uses), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def build_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2's 9 / 3
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (Q/K rows from HF's rotate-half order to GGML's interleaved one)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(folder: str, name: str = "tiny-llama.F32.gguf", seed: int = 0):
    """Write the GGUF file; returns `(path, source_model, tokenizers.Tokenizer)`."""
    import gguf

    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [" ".join(pair) if isinstance(pair, (tuple, list)) else pair for pair in _merges(tokenizer)]
    model = build_llama(len(tokens), seed)
    config = model.config

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|im_end|>"])
    writer.add_unk_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        q = _permute(torch.from_numpy(state[prefix + "self_attn.q_proj.weight"]), heads).numpy()
        k = _permute(torch.from_numpy(state[prefix + "self_attn.k_proj.weight"]), kv_heads).numpy()
        for gguf_name, value in [
            ("attn_norm", state[prefix + "input_layernorm.weight"]),
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", state[prefix + "self_attn.v_proj.weight"]),
            ("attn_output", state[prefix + "self_attn.o_proj.weight"]),
            ("ffn_norm", state[prefix + "post_attention_layernorm.weight"]),
            ("ffn_gate", state[prefix + "mlp.gate_proj.weight"]),
            ("ffn_up", state[prefix + "mlp.up_proj.weight"]),
            ("ffn_down", state[prefix + "mlp.down_proj.weight"]),
        ]:
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", value)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model, tokenizer


def _merges(tokenizer) -> list:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]
