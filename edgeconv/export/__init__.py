"""Exporters: GGUF for llama.cpp (gguf/), ONNX for onnxruntime(-genai) (onnx/), and the parity gate both pass."""
