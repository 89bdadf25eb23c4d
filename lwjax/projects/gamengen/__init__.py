"""GameNGen (arXiv 2408.14837): the ViZDoom environment and reward, trajectory recording, and (later) the agent."""
