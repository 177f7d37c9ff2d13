"""eval=features and eval=encode: what each latent fires on, and the codes on disk."""
