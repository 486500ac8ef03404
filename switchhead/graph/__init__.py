"""Graph utilities shared by the passes: op categories and index provenance."""
