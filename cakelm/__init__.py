"""cakelm: pretraining, supervised fine-tuning and reinforcement learning of Llama-style language models,
end to end on a laptop CPU, and the same code under torchrun on GPUs. Run `cakelm --help`."""

__version__ = "0.1.0"
