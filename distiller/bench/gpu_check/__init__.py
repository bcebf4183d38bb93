"""The GPU proof behind ``scripts/gpu_check.py``: tests, speed, accuracy, compile equality, DDP and packing.

``check_settings`` (what runs, at which sizes: the GPU's and the CPU rehearsal's), ``rows`` (a table
row, the time budget, the guard that keeps one failure from stopping the rest), ``speed_steps``
(gpu-marked tests, the step-speed benchmark, compile against eager), ``training_steps`` (accuracy of
the fast path, DDP), ``concurrency`` (several runs on one device), ``cifar_subset`` (the real-data
subset), ``check_report`` (table and JSON file) and ``check_run`` (the steps in order, under the budget).
"""
