"""Inference: the trained student turned into video files (`streamavatar generate`)."""
