"""Speed benchmarks against a release-style pipeline; results and their commands in RESULTS.md."""
