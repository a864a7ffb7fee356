"""A load generator for securechat and, side by side, ngircd: see `python -m scripts.loadgen --help`
and BENCHMARKS.md."""
