"""Deployable students trained on the pseudo labels: semantic (MaskCLIP+), instance (YOLACT)."""
