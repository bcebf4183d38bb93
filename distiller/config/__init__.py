"""The configuration: the typed schema of the two jobs (:mod:`.schema`), its validation and one-line
messages, Hydra's ConfigStore (:mod:`.store`), the command-line plumbing (:mod:`.command_line`),
per-pair settings (:mod:`.pairs`) and the GPU-slot callback of local sweeps (:mod:`.gpu_slots`).
"""
