"""otcbench: poisoning and backdoor attacks on CLIP pre-training, and the defenses against them."""

__version__ = "0.1.0"
