"""Evaluations of trained SAEs: traits, discovery, health, probes."""
