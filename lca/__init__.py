"""lca: long-context attention in JAX/Pallas.

Layers of the library, each depending only on those before it:
pallas_kernels <- lca.attention / lca.layers <- lca.model <- lca.decode / lca.train <- experiments.
"""

__version__ = "0.1.0"
