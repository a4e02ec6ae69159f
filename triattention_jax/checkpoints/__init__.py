"""Checkpoints: Hugging Face folders (`hf`), GGUF files (`gguf`), orbax checkpoints (`orbax`),
safetensors and TriAttention statistics files, tokenizers, and the model store (`store`) that
resolves a `--model` argument over all of them."""
