"""Measurement and preparation, built on api/ and core/: model preparation (`prepare`), the eval
harness, benchmarks (speed, capacity, policies), the architecture matrix and the demo.
"""
