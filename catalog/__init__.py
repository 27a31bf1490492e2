"""The shipped model catalog (YAML files), installed as package data ``mlx_stack.catalog_data``."""
