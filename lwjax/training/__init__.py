"""The one training loop every project uses: mesh, sharding, optimizer, checkpoints, trainer."""
