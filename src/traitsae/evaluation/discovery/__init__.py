"""eval=discovery: which latents separate two groups of images?"""
