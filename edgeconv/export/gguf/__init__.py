"""GGUF export for llama.cpp: architecture mapping, vocabulary, the writer, llama.cpp quantization and imatrix."""
