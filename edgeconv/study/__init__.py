"""The paper's study: the method grid swept on one MoE, the best distilled, and a dense-to-dense baseline."""
