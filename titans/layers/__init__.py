from .neural_memory import NeuralMemory, NeuralMemoryState

__all__ = ["NeuralMemory", "NeuralMemoryState"]
