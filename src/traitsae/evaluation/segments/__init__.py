"""eval=segments: do latents find segmented parts, patch by patch?"""
