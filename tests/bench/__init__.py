"""The lab: benchmarks that compare engines and measure latency (``python -m tests.bench``)."""
