"""dynlm: a language model whose weights keep learning while it reads (Wolf et al. 2018)."""

__version__ = "0.1.0"
