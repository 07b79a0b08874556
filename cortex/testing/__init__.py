"""Test and benchmark support, shipped so `benchmarks/` and `tests/` share one copy.

`fake_engine` is an instant OpenAI-style upstream (canned answers, no model); `gateway` runs a
real gateway process on a free port. The runtime code never imports this package (the gateway,
the pipeline and the command line work without it; tests/test_layers.py checks).
"""
