"""eval=splice and eval=steer: what the SAE changes in its backbone's output."""
