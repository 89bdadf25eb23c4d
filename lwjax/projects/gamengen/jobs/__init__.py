"""GameNGen's jobs (`lwjax.jobs`): `train_agent` (PPO agent, recording as it trains), `record_trajectories`."""
