"""eval=bench: one leaderboard for several SAEs of any origin on the same backbone and layer."""
