"""Model: the layer plan, the one block builder, and the decoder built from scanned segments."""
