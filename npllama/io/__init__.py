"""Reading and writing weights: safetensors (HF layout) and GGUF."""
