"""peftsweep: which PEFT method, at which learning rate and rank, gives the best adapter — fairly."""

__version__ = "0.1.0"
