"""Load-test suite for the service against its baselines (issue 5); entry point `python -m benchmarks.run`."""
