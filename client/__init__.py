"""What a hospital or bank runs: DP-SGD training of LoRA adapters on data that stays on site."""
