"""pytest-benchmark suite: ``python -m pytest bench``.

Each case is timed for the reference and every fused backend in the same run;
pytest-benchmark's table then shows each backend relative to the fastest.
"""
