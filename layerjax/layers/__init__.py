"""The atoms of a block: norms, attention, MLP, embeddings. They know nothing about depth."""
