"""edgeconv: turn a Mixture-of-Experts LLM into a small dense model for the edge."""

__version__ = "0.1.0"
