"""Model stages of Digital Human Batch: each module knows how to run one stage.

Nothing heavy is imported here: torch and friends load inside the stages that need them.
"""
