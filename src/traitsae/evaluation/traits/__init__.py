"""eval=cub_traits: do latents find CUB's annotated traits (precision@k vs baselines)?"""
