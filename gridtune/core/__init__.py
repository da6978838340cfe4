"""Small helpers every layer may use (stdlib only; imports nothing else of gridtune)."""
