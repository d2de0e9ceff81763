"""Optional integrations, each imported only when used: transformers, torchao (quantization)."""
