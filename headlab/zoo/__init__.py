"""The models headlab knows by name: the catalog (plain data), tiny random-init twins, the offline byte
tokenizer, GGUF conversion and the bundled llava-smol. ``headlab.load`` opens any of them by name."""
