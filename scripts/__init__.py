"""Command-line tools and sweep helpers (paper-table sweeps, results collector, GPU assignment)."""
