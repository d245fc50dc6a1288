"""ModelMax benchmarks: `make bench` measures the gateway against its upstream, interleaved, in one run."""
