"""orbax save/restore of CCALlama models (training state joins later). Needs no torch."""

from checkpoints.model_io import (
    CheckpointError,
    is_checkpoint,
    read_manifest,
    restore_model,
    save_model,
)

__all__ = ["CheckpointError", "is_checkpoint", "read_manifest", "restore_model", "save_model"]
