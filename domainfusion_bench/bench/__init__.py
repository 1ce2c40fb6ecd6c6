"""``dfbench bench``: training / ceiling / evaluation throughput per speed profile, and the collector's speed."""

from domainfusion_bench.bench.collector import bench_collector, write_sweep
from domainfusion_bench.bench.throughput import PROFILES, BenchOptions, Profile, format_report, run_bench

__all__ = ["PROFILES", "BenchOptions", "Profile", "run_bench", "format_report", "bench_collector", "write_sweep"]
