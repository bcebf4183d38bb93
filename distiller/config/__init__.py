"""The configuration: the typed schema of the two jobs (:mod:`.schema`), its validation and one-line messages
(:mod:`.validation`; what a job refuses before it starts, :mod:`.before_start`), Hydra's ConfigStore
(:mod:`.store`), the command-line plumbing (:mod:`.command_line`: one-line errors and the sweep's failure
report; the check before Hydra, :mod:`.preflight`; overrides read before Hydra, :mod:`.overrides`; advice on a
missing key, :mod:`.key_advice`; Hydra's run record held until the run starts, :mod:`.run_record`), per-pair
settings (:mod:`.pairs`) and the GPU-slot callback of local sweeps (:mod:`.gpu_slots`).
"""
