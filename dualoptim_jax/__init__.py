"""dualoptim_jax: DualOptim and DualOptim+ optimizers for JAX/Optax."""
