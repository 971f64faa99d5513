"""jaxtl: transfer learning in JAX."""
