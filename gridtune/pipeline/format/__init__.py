"""What a training file must be: validation, token counts, prices. Light enough for the server."""
