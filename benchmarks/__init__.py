"""nas's benchmarks: each module a script with a `--smoke` size (`tests/benchmarks/test_benchmarks.py` runs
it), run from the repository root as `python -m benchmarks.<name>`; `common` holds what several share.
Results and how to read them: benchmarks/README.md."""
