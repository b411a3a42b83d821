"""Resume / save handlers that add the trainer they are attached to into the checkpoint.

Why this is not the vendored ``scripts.checkpointing`` alone: a bundle config cannot put ``"trainer":
"@train#trainer"`` in the ``load_dict`` / ``save_dict`` of a handler that the trainer itself receives through
``train_handlers`` (MONAI's config resolver reports a circular reference). These subclasses of
:class:`~scripts.checkpointing.ResumeFromLatest` and :class:`~scripts.checkpointing.AtomicCheckpointSaver` add the
engine under ``trainer_key`` when they are attached, so the epoch and iteration counters are saved and restored
and a killed run continues from its last saved epoch.
"""

from __future__ import annotations

from typing import Any

from .checkpointing import AtomicCheckpointSaver, ResumeFromLatest


class ResumeTrainer(ResumeFromLatest):
    """:class:`ResumeFromLatest` with the engine it is attached to restored under ``trainer_key``."""

    def __init__(self, *args: Any, trainer_key: str = "trainer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer_key = trainer_key

    def attach(self, engine: Any) -> None:
        self.load_dict[self.trainer_key] = engine
        super().attach(engine)


class SaveTrainerCheckpoint(AtomicCheckpointSaver):
    """:class:`AtomicCheckpointSaver` with the engine it is attached to saved under ``trainer_key``."""

    def __init__(self, *args: Any, trainer_key: str = "trainer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer_key = trainer_key

    def attach(self, engine: Any) -> None:
        self.save_dict[self.trainer_key] = engine
        super().attach(engine)
