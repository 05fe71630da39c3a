"""Writing adapters and merged models in other tools' formats: GGUF for llama.cpp and Ollama
(``gguf``), and a DyLoRA adapter cut to one rank as a plain PEFT LoRA adapter (``rank``)."""
