"""Base models (built-in, local or tiny), and LoRA adapters on them."""
