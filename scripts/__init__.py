"""Command-line tools: paper-table sweeps, the results collector, the speed benchmark, the demo."""
