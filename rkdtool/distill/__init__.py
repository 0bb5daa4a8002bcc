"""Distillation: losses, methods (KD, FKD, RobustKD), detox-mask fitting and the trainer."""
