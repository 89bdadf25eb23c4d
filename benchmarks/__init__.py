"""Speed and scale measurements; each prints a table and a ratio line measured in one run."""
