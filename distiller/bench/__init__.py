"""Measurements: how fast our step runs and how much of the device it uses, against the older frameworks' loop.

The command files in ``scripts/`` parse arguments and print; the measuring lives here:

* ``step_speed``: the step-speed benchmark (``scripts/benchmark.py``): our step against
  ``reference_loop`` (the older frameworks' loop on the same networks and images), with FLOPs and
  MFU (``flops``), peak memory and the device's facts (``timing``);
* ``method_speed``: several methods' steps side by side (``scripts/benchmark.py --methods``);
* ``timed_step``: the step they time, from a run assembled as ``train_student.py`` assembles it;
* ``bench_settings``: ``configs/benchmark.yaml`` composed in process and its ``bench`` keys checked;
* ``loader_speed``: the streaming loader against torchvision's (``scripts/stream_benchmark.py``);
* ``gpu_check``: the whole GPU proof in one command (``scripts/gpu_check.py``).
"""
