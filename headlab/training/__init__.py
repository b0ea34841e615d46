"""The models headlab makes: Bigram-Backcopy training, the constructed sink model, llava-smol's training
recipe and its synthetic icon data. Nothing here runs when a model is loaded."""
