"""Running a model that may not fit in memory: the layer-by-layer forward, devices and dtypes, and the choice."""
