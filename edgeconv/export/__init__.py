"""Exporters: GGUF for llama.cpp, ONNX for onnxruntime(-genai)."""
