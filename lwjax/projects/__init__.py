"""What is particular to one paper (or job), built on the shared core. No project imports another."""
