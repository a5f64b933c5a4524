"""ONNX export for onnxruntime and onnxruntime-genai."""
