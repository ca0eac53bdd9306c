"""Real tokenizers for the token producer: local HF `tokenizer.json` files and chat templates."""
