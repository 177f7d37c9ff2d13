"""`eval=key` (dichotomous keys on latents) and `eval=audit` (propose latents, audit them on masks)."""
