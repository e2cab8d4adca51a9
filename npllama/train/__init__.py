"""Training: optimizers, schedules, clipping, data and the trainer loop.

    from npllama.train import AdamW, Schedule, clip_grad_norm, TokenFile, Batcher, Trainer, TrainConfig, encode_chat
"""
from npllama.train.chat import ChatDataError, encode_chat
from npllama.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npllama.train.clip import clip_grad_norm, grad_norm
from npllama.train.data import Batcher, DataError, TokenFile, build_token_file, write_token_file
from npllama.train.optim import SGD, AdamW, Optimizer
from npllama.train.schedule import Schedule, lr_at
from npllama.train.trainer import TrainConfig, TrainConfigError, Trainer, TrainingDiverged

__all__ = ["AdamW", "SGD", "Optimizer", "Schedule", "lr_at", "clip_grad_norm", "grad_norm", "TokenFile", "Batcher",
           "DataError", "build_token_file", "write_token_file", "Trainer", "TrainConfig", "TrainConfigError",
           "TrainingDiverged", "CheckpointError", "save_checkpoint", "load_checkpoint", "encode_chat",
           "ChatDataError"]
