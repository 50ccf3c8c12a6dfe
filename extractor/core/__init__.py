"""Model access and the maths (torch only): loading, adapters, capture, the one recomputation, verification, tokens."""
