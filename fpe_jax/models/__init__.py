"""Model forwards as pure functions: Llama (GGUF weights), BERT/MiniLM (safetensors), CNNs."""
