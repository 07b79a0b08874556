"""The `cortex` command line: a layer on top of the core (`cortex/`) and the Prefect flows
(`flows/`). The core never imports it, nor flows, tasks or Prefect (tests/test_layers.py)."""
