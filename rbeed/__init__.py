"""rbeed: serve local LLMs through one job API — a Trio daemon with llama.cpp workers."""

__version__ = "0.1.0"
