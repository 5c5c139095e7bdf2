"""Compiler: options, pass pipelines per target, lowering and the artifact writer.

This package's __init__ imports nothing heavy: the runtime reads `errors` and `manifest` from here.
"""
