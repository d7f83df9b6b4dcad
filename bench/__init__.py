"""hpcproc benchmarks: ``python -m bench SUITE [--transport NAME] [--quick] [--json PATH]``."""
