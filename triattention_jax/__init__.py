"""TriAttention KV-cache compression for Llama / Qwen decoders in JAX."""
