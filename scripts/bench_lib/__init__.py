"""Helpers of scripts/bench_server.py: prompts, load generator, systems under test, the raw
BatchGenerator loop, adapters for the swap workload, and the report. Nothing here is part of
the mlxsup package; the benchmark may use tools (matplotlib) that the package does not."""
