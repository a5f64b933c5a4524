"""Evaluation data and tasks shared by the demo training and `edgeconv eval`."""
