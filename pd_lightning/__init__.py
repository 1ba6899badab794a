"""pd-lightning: a lab for pre-training distillation (PD) of large language models."""

__version__ = "0.1.0"
