"""kvtier.fidelity: SmolLM2-135M in numpy and the harness that measures what
each KV-cache policy does to its outputs (python -m kvtier.fidelity --help)."""
