"""Datasets written by the project and shipped with it (each folder: data, build script, license)."""
