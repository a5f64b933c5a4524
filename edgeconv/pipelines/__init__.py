"""Pipelines that chain stages: convert (calibrate -> plan -> assemble), build (... -> bundle -> bench), sweep."""
