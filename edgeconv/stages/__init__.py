"""Pipeline stages: each is `run(inputs, options) -> result`, writing a directory with manifest.json."""
