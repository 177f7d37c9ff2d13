"""eval=traits_table: the specimen x trait table (how much of each latent, and where)."""
