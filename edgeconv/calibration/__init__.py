"""Calibration: run the MoE teacher layer by layer on text and collect per-expert statistics."""
