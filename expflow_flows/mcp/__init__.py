"""``expflow mcp``: the Model Context Protocol server for research agents."""
