"""Defaults every entry point shares (CLI, Python API, build, resolver); importing this costs nothing."""

DEFAULT_MODEL = "msag-unet"  # the shipped checkpoint with the best test Dice (README table)
