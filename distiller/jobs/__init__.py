"""The jobs a user runs: train a network or distill one (:mod:`.train`, the composition root that builds
everything and hands it to the engine), evaluate a checkpoint (:mod:`.evaluate`), and the teacher
index (:mod:`.teachers`).
"""
