"""Reading and writing checkpoints and text data without holding a whole model (or corpus) in memory."""
