"""orbax save/restore of CCALlama models (``model_io``) and of training state
(``train_state.TrainCheckpointer``, imported on first use). Needs no torch."""

from checkpoints.model_io import (
    CheckpointError,
    is_checkpoint,
    read_manifest,
    restore_model,
    save_model,
)

__all__ = ["CheckpointError", "TrainCheckpointer", "is_checkpoint", "read_manifest",
           "restore_model", "save_model"]


def __getattr__(name):
    if name == "TrainCheckpointer":
        from checkpoints.train_state import TrainCheckpointer

        return TrainCheckpointer
    raise AttributeError(f"module 'checkpoints' has no attribute {name!r}")
