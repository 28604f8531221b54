"""Speed benchmarks: this project's training path against a release-style pipeline.

Run the scripts from the repository root, e.g. `python benchmarks/bench_mnist.py --help`;
measured numbers and the commands that printed them are in benchmarks/RESULTS.md.
"""
