"""Target device profiles (one TOML per device class) and their notes, shipped as package data."""
