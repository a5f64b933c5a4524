"""Dense2MoE: fuse runs of redundant layers of a dense model into MoE layers (the stage: stages/upcycle.py)."""
