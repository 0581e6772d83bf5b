"""Text generation: pure sampling functions, stop strings, and the batching engine."""

from llamalab.generation.engine import Engine, Generation, GenerationEvent, Request
from llamalab.generation.sampling import GREEDY, SamplingParams

__all__ = ["GREEDY", "Engine", "Generation", "GenerationEvent", "Request", "SamplingParams"]
