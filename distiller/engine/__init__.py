"""The engine: one training step (:mod:`.step`, the public seam), the loop that runs a plan of phases
(:mod:`.loop`, :mod:`.plan`), and what they stand on: runtime (device, precision, DDP), evaluation,
meter, checkpoints, the run log, ``torch.compile`` and the teacher-output cache.

It never learns which distillation method it runs; it receives built objects and runs them.
"""
