"""Reading and writing checkpoints without holding a whole model in memory."""
