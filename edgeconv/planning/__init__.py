"""Planning: the plan format, the model facts it needs, and the planners (calibration-free, from statistics)."""
