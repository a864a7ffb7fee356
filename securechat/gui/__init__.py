"""The desktop client: the same Client API as the terminal client, in a Tk window."""
