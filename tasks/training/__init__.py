"""Training stages: teacher fine-tuning, ODE pairs, distillation (ODE init + SiD), adversarial refinement."""
