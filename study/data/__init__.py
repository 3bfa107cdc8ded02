"""Generators of the shipped data files and the study's datasets (written into ntkal/data/, which ships them)."""
