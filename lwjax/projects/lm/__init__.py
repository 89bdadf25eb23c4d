"""Language-model pretraining of the core GPT: the framework's first experiment and the demo."""
