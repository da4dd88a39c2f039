"""Distillation: the KD loss (`kd`), the training loop (`loop`), checkpoints (`checkpoint`), DDP/FSDP helpers (`dist`), torchrun jobs (`launch`)."""
