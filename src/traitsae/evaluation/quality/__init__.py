"""eval=health, eval=dictionary, eval=probe: how good is the SAE as a model?"""
