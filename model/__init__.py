"""torch modules only: the teacher/student DiT, streaming attention, audio encoders, VAE wrapper (model-core issue)."""
